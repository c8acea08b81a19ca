"""What the three LLM stages share: build requests, run them through the cache, parse JSON strictly."""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import polars as pl

from fineinstructions_dagster.lib.stats import StageStats
from fineinstructions_dagster.llm.cache import GenerationCache, GenerationStats, generate_cached
from fineinstructions_dagster.llm.engines import GenerationRequest, GenerationResult, LLMEngine, SamplingConfig

# Columns every LLM stage records for each generation (lineage: prompt, raw output, model, sampling).
GENERATION_SCHEMA: dict[str, pl.DataType] = {
    "prompt": pl.String(), "raw_output": pl.String(), "finish_reason": pl.String(),
    "prompt_tokens": pl.Int64(), "completion_tokens": pl.Int64(), "model": pl.String(),
    "model_revision": pl.String(), "backend": pl.String(), "prompt_version": pl.String(),
    "sampling_params": pl.String(), "run_id": pl.String(),
}
QUARANTINE_EXTRA: dict[str, pl.DataType] = {"reason": pl.String(), "detail": pl.String()}


def frame(rows: list[dict[str, Any]], schema: dict[str, pl.DataType]) -> pl.DataFrame:
    """Rows as a frame with a fixed schema, so that empty partitions keep their columns."""
    return pl.DataFrame(rows, schema=schema) if rows else pl.DataFrame(schema=schema)


@dataclass
class LLMCall:
    """What a stage needs to generate: the engine, its cache, and where to count."""

    engine: LLMEngine
    cache: GenerationCache | None
    stats: GenerationStats

    def run(self, requests: list[GenerationRequest], prompt_version: str) -> list[GenerationResult]:
        return generate_cached(self.engine, requests, prompt_version, self.cache, self.stats)

    def provenance(self, prompt_version: str, sampling: SamplingConfig) -> dict[str, str]:
        return {
            "model": self.engine.info.model,
            "model_revision": self.engine.info.revision,
            "backend": self.engine.info.backend,
            "prompt_version": prompt_version,
            "sampling_params": json.dumps(sampling.as_dict(), sort_keys=True),
        }


def seed_for(*parts: str) -> int:
    """A per-request seed derived from the row's id: sampling is reproducible row by row."""
    return int(hashlib.sha256("\x1f".join(parts).encode()).hexdigest()[:8], 16)


# At most one markdown code fence, wrapping the whole output (chat models add it even under a schema).
_CODE_FENCE = re.compile(r"\A```(?:json)?[ \t]*\n?(?P<body>.*?)\n?[ \t]*```\Z", re.DOTALL | re.IGNORECASE)


class _DuplicateKey(Exception):
    pass


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """object_pairs_hook: a repeated key is an error, not 'the last one wins' (a planted second "score")."""
    obj: dict[str, Any] = {}
    for key, value in pairs:
        if key in obj:
            raise _DuplicateKey(key)
        obj[key] = value
    return obj


def parse_json_object(result: GenerationResult, required: tuple[str, ...]) -> tuple[dict[str, Any] | None, str]:
    """Strictly parse a generation as one JSON object with the required keys: (object, '') or
    (None, reason). Never trusts the model: structured decoding can still be cut off by max_tokens. The whole
    output must be the object (whitespace and one wrapping code fence aside): no salvaging an object out of
    prose, where it may be one the model copied from the document it was shown."""
    if result.error:
        return None, "generation_failed"
    text = result.text.strip()
    if fenced := _CODE_FENCE.match(text):
        text = fenced.group("body")
    try:
        obj = json.loads(text, strict=False, object_pairs_hook=_unique_keys)  # strict=False: raw control chars
    except _DuplicateKey:
        return None, "duplicate_key"
    except (json.JSONDecodeError, RecursionError):  # incl. text after the object; absurdly deep nesting
        return None, "truncated_output" if result.finish_reason == "length" else "unparseable_json"
    if not isinstance(obj, dict):
        return None, "not_an_object"
    missing = [k for k in required if k not in obj]
    if missing:
        return None, "missing_field"
    return obj, ""


# interpret(row, result) -> (columns to add to a kept row, "") or ({}, reason to quarantine it)
Interpret = Callable[[dict[str, Any], GenerationResult], tuple[dict[str, Any], str]]


# Failures where asking once more can help: the output's form was wrong, not its content.
REPAIRABLE = frozenset({"unparseable_json", "truncated_output", "missing_field", "not_an_object",
                        "duplicate_key", "malformed_flow_output"})
_REPAIR_HINT = {
    "truncated_output": "it was cut off before it was complete; write a shorter version",
    "malformed_flow_output": "it did not end with <feedback>...</feedback> followed by <score>...</score>",
}


def repair_request(request: GenerationRequest, result: GenerationResult, reason: str) -> GenerationRequest:
    """One more turn in the same conversation: the failed output and what was wrong with it. Same schema, so
    structured decoding still applies; another seed, so sampling does not repeat itself."""
    hint = _REPAIR_HINT.get(reason, "it was not one valid JSON object with every required field")
    messages = request.messages + (
        ("assistant", result.text[:4000]),
        ("user", f"That output could not be used: {hint}. Reply again with only the corrected output, "
                 "in exactly the required format."),
    )
    return GenerationRequest(messages, request.sampling, request.seed + 1, request.json_schema)


def run_generation_stage(
    rows: list[dict[str, Any]], requests: list[GenerationRequest], llm: LLMCall, prompt_version: str,
    sampling: SamplingConfig, identify: Callable[[dict[str, Any], dict[str, str]], dict[str, Any]],
    interpret: Interpret, stats: StageStats, repair: bool = True,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The loop the three LLM stages share: generate (through the cache), record prompt, raw output and
    provenance for every row, then keep it or quarantine it with the reason `interpret` gives. Output whose
    form was wrong (REPAIRABLE) gets one repair turn, batched and cached like the first; what still fails is
    quarantined with its first reason, both raw outputs kept."""
    results = llm.run(requests, prompt_version)
    outcomes = [interpret(row, res) for row, res in zip(rows, results, strict=True)]
    retry = [i for i, (_, reason) in enumerate(outcomes) if repair and reason in REPAIRABLE]
    repaired: dict[int, tuple[GenerationResult, tuple[dict[str, Any], str]]] = {}
    if retry:
        second = llm.run([repair_request(requests[i], results[i], outcomes[i][1]) for i in retry],
                         prompt_version + "+repair")
        repaired = {i: (res, interpret(rows[i], res)) for i, res in zip(retry, second, strict=True)}
    prov = llm.provenance(prompt_version, sampling)
    kept: list[dict[str, Any]] = []
    quarantined: list[dict[str, Any]] = []
    n_repaired = 0
    for i, (row, res) in enumerate(zip(rows, results, strict=True)):
        fields, reason = outcomes[i]
        detail = res.error or ""
        if i in repaired:
            res2, (fields2, reason2) = repaired[i]
            if not reason2:
                res, fields, reason = res2, fields2, ""
                n_repaired += 1
            else:
                detail = f"repair failed ({reason2}); repair output: {res2.text[:2000]}"
        record = {**identify(row, prov), "prompt": res.prompt, "raw_output": res.text,
                  "finish_reason": res.finish_reason, "prompt_tokens": res.prompt_tokens,
                  "completion_tokens": res.completion_tokens, **prov}
        if reason:
            quarantined.append({**record, "reason": reason, "detail": detail})
            stats.drop(reason)
        else:
            kept.append({**record, **fields})
    stats.kept = len(kept)
    stats.extra.update(llm.stats.as_dict())
    stats.extra.update(repair_attempts=len(retry), repaired=n_repaired)
    stats.check_balanced()
    return kept, quarantined
