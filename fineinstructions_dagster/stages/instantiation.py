"""Stage 5, instantiation: fill a matched template's slots from the document and answer it from the
document; measure how much of the answer is copied from the document (grounding)."""

from __future__ import annotations

import re

import polars as pl

from fineinstructions_dagster.lib.ids import content_id
from fineinstructions_dagster.lib.stats import StageStats
from fineinstructions_dagster.llm.engines import GenerationRequest, SamplingConfig
from fineinstructions_dagster.prompts import instantiate
from fineinstructions_dagster.prompts.common import truncate
from fineinstructions_dagster.stages.llm_calls import (
    GENERATION_SCHEMA,
    QUARANTINE_EXTRA,
    LLMCall,
    frame,
    parse_json_object,
    seed_for,
)

BASE_SCHEMA: dict[str, pl.DataType] = {
    "instantiation_id": pl.String(), "match_id": pl.String(), "doc_id": pl.String(), "template_id": pl.String(),
    "shard": pl.String(),
} | GENERATION_SCHEMA
INSTANTIATION_SCHEMA = BASE_SCHEMA | {"instruction": pl.String(), "answer": pl.String(),
                                      "grounding": pl.Float64()}

_WORD = re.compile(r"\w+", re.UNICODE)


def grounding(answer: str, document: str, span: int = 3) -> float:
    """Share of the answer's word tokens that lie inside a run of >= `span` consecutive words also
    found, in order, in the document. 1.0 = entirely copied, 0.0 = nothing copied."""
    a = [w.lower() for w in _WORD.findall(answer)]
    if not a:
        return 0.0
    d = [w.lower() for w in _WORD.findall(document)]
    if len(a) < span:  # too short for a span: grounded only if it occurs verbatim
        n = len(a)
        return 1.0 if any(d[i:i + n] == a for i in range(len(d) - n + 1)) else 0.0
    grams = {tuple(d[i:i + span]) for i in range(len(d) - span + 1)}
    covered = [False] * len(a)
    for i in range(len(a) - span + 1):
        if tuple(a[i:i + span]) in grams:
            covered[i:i + span] = [True] * span
    return sum(covered) / len(a)


def gate_instantiation(instruction: str, answer: str, template: str) -> str | None:
    """Validity gates on a parsed instantiation: the reason it is unusable, or None."""
    if not answer.strip():
        return "empty_answer"
    if not instruction.strip():
        return "empty_instruction"
    if "<fi>" in instruction or "</fi>" in instruction:
        return "unfilled_slot"
    if " ".join(instruction.split()).lower() == " ".join(template.split()).lower():
        return "copies_template"
    return None


def instantiate_matches(
    pending: pl.DataFrame, llm: LLMCall, sampling: SamplingConfig, max_document_chars: int,
    max_instruction_chars: int, max_answer_chars: int, run_id: str = "",
) -> tuple[pl.DataFrame, pl.DataFrame, StageStats]:
    """`pending`: one row per match with columns match_id, doc_id, template_id, shard, text, template.
    Returns (instantiations, quarantined rows with reason and raw output, stats)."""
    stats = StageStats(total=pending.height)
    schema = instantiate.schema(max_instruction_chars, max_answer_chars)
    # Sorted by document so that a document's k prompts sit together and share their prefix.
    rows = pending.sort("doc_id", "match_id").to_dicts()
    requests = [
        GenerationRequest(instantiate.messages(truncate(r["text"], max_document_chars), r["template"]),
                          sampling, seed_for(r["match_id"]), schema)
        for r in rows
    ]
    results = llm.run(requests, instantiate.PROMPT_VERSION)
    prov = llm.provenance(instantiate.PROMPT_VERSION, sampling)
    kept, quarantined = [], []
    for r, res in zip(rows, results, strict=True):
        record = {
            "instantiation_id": content_id("instantiation", r["match_id"], prov),
            "match_id": r["match_id"], "doc_id": r["doc_id"], "template_id": r["template_id"],
            "shard": r["shard"], "prompt": res.prompt, "raw_output": res.text,
            "finish_reason": res.finish_reason, "prompt_tokens": res.prompt_tokens,
            "completion_tokens": res.completion_tokens, **prov, "run_id": run_id,
        }
        obj, reason = parse_json_object(res, ("instruction", "answer"))
        if obj is not None:
            instruction, answer = str(obj["instruction"]).strip(), str(obj["answer"]).strip()
            reason = gate_instantiation(instruction, answer, r["template"]) or ""
        if reason:
            quarantined.append({**record, "reason": reason, "detail": res.error or ""})
            stats.drop(reason)
            continue
        kept.append({**record, "instruction": instruction, "answer": answer,
                     "grounding": grounding(answer, r["text"])})
    stats.kept = len(kept)
    stats.extra.update(llm.stats.as_dict())
    stats.check_balanced()
    return frame(kept, INSTANTIATION_SCHEMA), frame(quarantined, BASE_SCHEMA | QUARANTINE_EXTRA), stats
