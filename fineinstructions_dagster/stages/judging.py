"""Stage 6, judging: an LLM judge scores each instruction/answer pair against its document on a
1-5 Likert rubric; the score is parsed and range-checked, never trusted."""

from __future__ import annotations

from typing import Any

import polars as pl

from fineinstructions_dagster.lib.ids import content_id
from fineinstructions_dagster.lib.stats import StageStats
from fineinstructions_dagster.llm.engines import GenerationRequest, GenerationResult, SamplingConfig
from fineinstructions_dagster.prompts import judge
from fineinstructions_dagster.prompts.common import truncate
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
    except (TypeError, ValueError):
        return None
    return score if 1 <= score <= 5 and float(value) == score else None  # type: ignore[arg-type]


def judge_instantiations(
    pending: pl.DataFrame, llm: LLMCall, sampling: SamplingConfig, max_document_chars: int,
    max_feedback_chars: int, run_id: str = "",
) -> tuple[pl.DataFrame, pl.DataFrame, StageStats]:
    """`pending`: instantiation_id, doc_id, shard, text, instruction, answer. Returns (judgements,
    quarantined rows, stats)."""
    stats = StageStats(total=pending.height)
    schema = judge.schema(max_feedback_chars)
    rows = pending.sort("doc_id", "instantiation_id").to_dicts()
    requests = [
        GenerationRequest(judge.messages(truncate(r["text"], max_document_chars), r["instruction"], r["answer"]),
                          sampling, seed_for(r["instantiation_id"]), schema)
        for r in rows
    ]

    def identify(r: dict[str, Any], prov: dict[str, str]) -> dict[str, Any]:
        return {"judgement_id": content_id("judgement", r["instantiation_id"], prov),
                "instantiation_id": r["instantiation_id"], "doc_id": r["doc_id"], "shard": r["shard"],
                "run_id": run_id}

    def interpret(r: dict[str, Any], res: GenerationResult) -> tuple[dict[str, Any], str]:
        obj, reason = parse_json_object(res, ("feedback", "score"))
        if obj is None:
            return {}, reason
        score = parse_score(obj["score"])
        if score is None:
            return {}, "score_out_of_range"
        return {"score": score, "feedback": str(obj["feedback"]).strip()}, ""

    kept, quarantined = run_generation_stage(rows, requests, llm, judge.PROMPT_VERSION, sampling, identify,
                                             interpret, stats)
    return frame(kept, JUDGEMENT_SCHEMA), frame(quarantined, BASE_SCHEMA | QUARANTINE_EXTRA), stats
