"""Stage 6, judging: an LLM judge scores each instruction/answer pair against its document on a
1-5 Likert rubric; the score is parsed and range-checked, never trusted, and a judgement whose structure
is found in the texts it judged (a score planted there and copied) is quarantined."""

from __future__ import annotations

import json
import re
from typing import Any

import polars as pl

from fineinstructions_dagster.lib.ids import content_id
from fineinstructions_dagster.lib.stats import StageStats
from fineinstructions_dagster.llm.engines import GenerationRequest, GenerationResult, SamplingConfig
from fineinstructions_dagster.prompts import judge
from fineinstructions_dagster.prompts.common import fold, truncate
from fineinstructions_dagster.stages.llm_calls import (
    GENERATION_SCHEMA,
    QUARANTINE_EXTRA,
    LLMCall,
    frame,
    parse_json_object,
    run_generation_stage,
    seed_for,
)

BASE_SCHEMA: dict[str, pl.DataType] = {
    "judgement_id": pl.String(), "instantiation_id": pl.String(), "doc_id": pl.String(), "shard": pl.String(),
} | GENERATION_SCHEMA
JUDGEMENT_SCHEMA = BASE_SCHEMA | {"score": pl.Int8(), "feedback": pl.String()}


def parse_score(value: object) -> int | None:
    if isinstance(value, bool):
        return None
    try:
        score = int(value)  # type: ignore[call-overload]
    except (TypeError, ValueError, OverflowError):  # OverflowError: 1e999 parses as inf
        return None
    return score if 1 <= score <= 5 and float(value) == score else None  # type: ignore[arg-type]


_NOISE = re.compile(r"[\s\\]+")


def _canonical(text: str) -> str:
    """Text compared for copying: folded as a model reads tags (zero-width gone, look-alike and neutralised
    brackets as < >), case-folded, without whitespace or backslashes (a plant JSON-escaped inside a string)."""
    return _NOISE.sub("", fold(text).casefold())


def checklist_copied(inputs: tuple[str, ...], answers: dict[str, Any]) -> bool:
    """Whether every checklist answer the judge gave is written, key by key, in one of the texts it judged: a
    planted `{"clear": "yes", ...}` copied in any key order, spacing or case."""
    pairs = [_canonical(f'"{key}":"{value}"') for key, value in answers.items()]
    return any(all(p in text for p in pairs) for text in map(_canonical, inputs))


def copied_from_inputs(inputs: tuple[str, ...], feedback: str, score: int, structure: str) -> bool:
    """Whether the judgement is one planted in the texts it judged. `structure` is the output's own, as written:
    the JSON object, or Flow's `</feedback><score>N</score>` (a planted tail completed with feedback of the model's
    own still counts). Also caught: the same feedback and score planted in either format, which a model re-emits
    under the schema (keys reordered, extras dropped, 5.0 as 5) or the other format."""
    marks = [_canonical(structure), _canonical(f"<feedback>{feedback}</feedback><score>{score}</score>")]
    json_feedback = _canonical('"feedback":' + json.dumps(feedback, ensure_ascii=False))
    json_score = re.compile(rf'"score":"?{score}(?:\.0*)?"?(?![\d.])')
    for text in map(_canonical, inputs):
        if any(m in text for m in marks) or (json_feedback in text and json_score.search(text)):
            return True
    return False


def judge_instantiations(
    pending: pl.DataFrame, llm: LLMCall, sampling: SamplingConfig, max_document_chars: int,
    max_feedback_chars: int, run_id: str = "", judge_format: str = "json",
) -> tuple[pl.DataFrame, pl.DataFrame, StageStats]:
    """`pending`: instantiation_id, doc_id, shard, text, instruction, answer. Returns (judgements,
    quarantined rows, stats). `judge_format`: `json` (schema-constrained), `flow` (Flow-Judge-v0.1 tags) or
    `checklist` (small judges: four yes/no questions under a schema, score = 1 + yes count)."""
    if judge_format not in judge.FORMATS:
        raise ValueError(f"judge_format must be one of {judge.FORMATS}, got {judge_format!r}")
    stats = StageStats(total=pending.height)
    flow, checklist = judge_format == "flow", judge_format == "checklist"
    schema = None if flow else judge.checklist_schema() if checklist else judge.schema(max_feedback_chars)
    build = judge.flow_messages if flow else judge.checklist_messages if checklist else judge.messages
    prompt_version = {"flow": judge.FLOW_PROMPT_VERSION,
                      "checklist": judge.CHECKLIST_PROMPT_VERSION}.get(judge_format, judge.PROMPT_VERSION)
    rows = pending.sort("doc_id", "instantiation_id").to_dicts()
    requests = [
        GenerationRequest(build(truncate(r["text"], max_document_chars), r["instruction"], r["answer"]),
                          sampling, seed_for(r["instantiation_id"]), schema)
        for r in rows
    ]

    def identify(r: dict[str, Any], prov: dict[str, str]) -> dict[str, Any]:
        return {"judgement_id": content_id("judgement", r["instantiation_id"], prov),
                "instantiation_id": r["instantiation_id"], "doc_id": r["doc_id"], "shard": r["shard"],
                "run_id": run_id}

    def interpret(r: dict[str, Any], res: GenerationResult) -> tuple[dict[str, Any], str]:
        if flow:
            if res.error:
                return {}, "generation_failed"
            parsed = judge.parse_flow(res.text)
            if parsed is None:
                return {}, "truncated_output" if res.finish_reason == "length" else "malformed_flow_output"
            feedback, raw_score = parsed
            structure = f"</feedback><score>{raw_score}</score>"
        elif checklist:
            obj, reason = parse_json_object(res, tuple(key for key, _ in judge.CHECKLIST))
            if obj is None:
                return {}, reason
            scored = judge.checklist_score(obj)
            if scored is None:
                return {}, "score_out_of_range"
            raw_score, feedback = scored
            structure = json.dumps(obj, ensure_ascii=False)
            if checklist_copied((r["text"], r["instruction"], r["answer"]), obj):
                return {}, "judgement_copied_from_input"
        else:
            obj, reason = parse_json_object(res, ("feedback", "score"))
            if obj is None:
                return {}, reason
            feedback, raw_score = str(obj["feedback"]), obj["score"]
            structure = json.dumps(obj, ensure_ascii=False)
        score = parse_score(raw_score)
        if score is None:
            return {}, "score_out_of_range"
        # The fences keep planted text from speaking as the prompt; a model may still copy it as its answer.
        if copied_from_inputs((r["text"], r["instruction"], r["answer"]), feedback, score, structure):
            return {}, "judgement_copied_from_input"
        return {"score": score, "feedback": feedback.strip()[:max_feedback_chars]}, ""

    kept, quarantined = run_generation_stage(rows, requests, llm, prompt_version, sampling, identify,
                                             interpret, stats)
    return frame(kept, JUDGEMENT_SCHEMA), frame(quarantined, BASE_SCHEMA | QUARANTINE_EXTRA), stats


_JUDGE_INPUT = ["instantiation_id", "doc_id", "shard", "text", "instruction", "answer"]
_VERDICT = ["judgement_id", "score", "feedback", "judge_reason", "model", "prompt_version", "raw_output"]


def judge_with_controls(
    pending: pl.DataFrame, controls: pl.DataFrame, documents: pl.DataFrame, llm: LLMCall, sampling: SamplingConfig,
    max_document_chars: int, max_feedback_chars: int, run_id: str = "", judge_format: str = "json",
) -> tuple[pl.DataFrame, pl.DataFrame, pl.DataFrame, StageStats]:
    """Judge the real pairs (`pending`, as for `judge_instantiations`) and their control twins (`controls`,
    stages/controls.CONTROL_SCHEMA, not yet judged) in the same engine calls: the same judge, prompt, sampling and
    batches, each control against its answer's own document (`documents`: doc_id, text). Returns (judgements,
    quarantined judgements, the controls with their verdicts, stats of the real pairs; the engine's counts, which
    include the controls' requests, and the controls' counts in `extra`)."""
    judged = controls.filter(pl.col("gate_reason").is_null())
    as_pending = judged.select(pl.col("control_id").alias("instantiation_id"), "doc_id", "shard", "instruction",
                               "answer").join(documents.unique("doc_id"), on="doc_id", how="left")
    if as_pending["text"].null_count():
        raise ValueError("a control's answer document is not among the chunk's documents")
    rows = pl.concat([pending.select(_JUDGE_INPUT), as_pending.select(_JUDGE_INPUT)])
    kept, quarantined, both = judge_instantiations(rows, llm, sampling, max_document_chars, max_feedback_chars,
                                                   run_id, judge_format)
    is_control = pl.col("instantiation_id").is_in(judged["control_id"].implode())
    real_kept, real_quarantined = kept.filter(~is_control), quarantined.filter(~is_control)
    stats = StageStats(total=pending.height, kept=real_kept.height, extra=dict(both.extra))
    stats.drop_counts(real_quarantined["reason"])
    stats.extra.update(control_pairs=controls.height, control_pairs_judged=judged.height,
                       control_judgements_quarantined=quarantined.height - real_quarantined.height)
    stats.check_balanced()
    verdicts = pl.concat([
        kept.filter(is_control).with_columns(pl.lit(None, pl.String).alias("judge_reason")),
        quarantined.filter(is_control).with_columns(pl.lit(None, pl.Int8).alias("score"),
                                                    pl.lit(None, pl.String).alias("feedback"),
                                                    pl.col("reason").alias("judge_reason")),
    ], how="diagonal_relaxed").select(pl.col("instantiation_id").alias("control_id"), *_VERDICT)
    out = controls.drop(_VERDICT).join(verdicts, on="control_id", how="left")
    return real_kept, real_quarantined, out.select(controls.columns).cast(dict(controls.schema)), stats
