"""Control pairs: the measurement of whether the gates filter, for any judge on any hardware.

A share of each shard's judged pairs gets control twins that must not pass:
- `swapped`: the same instruction with the answer of another document of the shard, judged and grounded against
  that answer's own document (so grounding cannot give it away: the answer is a real quote of a real document);
- `near_miss`: the same instruction with another passage of its own document, one the answer did not use.

Controls are chosen by content hash (the same ones on every run), judged in the same engine batches as the real
pairs, pass through every gate, and are never exported or counted as pairs. Their outcome is data: how many the
gates keep, and how well each signal (judge score, grounding, relevance) tells a real pair from a control (AUC).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable
from typing import Any

import numpy as np
import polars as pl

from fineinstructions_dagster.lib.ids import content_id
from fineinstructions_dagster.prompts.common import truncate
from fineinstructions_dagster.prompts.instantiate import document_sentences
from fineinstructions_dagster.stages.instantiation import fill_signals, gate_instantiation, grounding

KINDS = ("swapped", "near_miss")
SIGNALS = ("judge_score", "grounding", "relevance", "relevance_margin", "fill_in_document", "fill_in_answer")
# A document sentence the answer shares at least this share of words with (in runs of >= 3) counts as used.
USED_SENTENCE_OVERLAP = 0.25
MAX_NEAR_MISS_SENTENCES = 3

CONTROL_SCHEMA: dict[str, pl.DataType] = {
    "control_id": pl.String(), "instantiation_id": pl.String(), "control_kind": pl.String(), "shard": pl.String(),
    "instruction_doc_id": pl.String(), "doc_id": pl.String(),  # doc_id: the answer's document (judged against it)
    "instruction": pl.String(), "answer": pl.String(), "grounding": pl.Float64(), "relevance": pl.Float64(),
    # the instruction's baseline, its instantiation's: the same instruction, so the same reference answers
    "relevance_baseline": pl.Float64(), "relevance_model": pl.String(), "fill_in_document": pl.Float64(),
    "fill_in_answer": pl.Float64(),
    "gate_reason": pl.String(),  # an instantiation gate the control failed (then it is not judged), else null
    "judgement_id": pl.String(), "score": pl.Int8(), "feedback": pl.String(),
    "judge_reason": pl.String(),  # why its judgement was quarantined (unparsed output, ...), else null
    "model": pl.String(), "prompt_version": pl.String(), "raw_output": pl.String(), "run_id": pl.String(),
}


def _rank(key: str) -> int:
    return int(hashlib.sha256(key.encode()).hexdigest()[:16], 16)


def controls_in_chunk(chunk_rows: int, shard_rows: int, share: float, min_per_shard: int) -> int:
    """How many of a chunk's pairs get twins: `share` of them, and the chunk's part of `min_per_shard` (so a shard
    of several chunks still reaches the minimum), never more than the chunk has."""
    if chunk_rows == 0 or (share <= 0 and min_per_shard <= 0):
        return 0
    floor = math.ceil(min_per_shard * chunk_rows / max(shard_rows, chunk_rows))
    return min(chunk_rows, max(math.ceil(share * chunk_rows), floor))


def _used(sentence: str, answer: str) -> bool:
    return grounding(sentence, answer) >= USED_SENTENCE_OVERLAP


def near_miss_passage(document: str, answer: str, key: str, min_words: int) -> str | None:
    """Another passage of `document` the answer did not use: as many consecutive unused sentences as the answer
    has (1..3), at least `min_words` words, picked by `key`'s hash among the places it fits; None when the
    document has no such passage."""
    sentences = document_sentences(document)
    if not sentences:
        return None
    unused = [not _used(s, answer) for s in sentences]
    n = min(MAX_NEAR_MISS_SENTENCES, max(1, len(document_sentences(answer)) or 1))
    for size in range(n, MAX_NEAR_MISS_SENTENCES + 1):  # widen a window too short for the length gate
        starts = [i for i in range(len(sentences) - size + 1)
                  if all(unused[i:i + size]) and sum(len(s.split()) for s in sentences[i:i + size]) >= min_words]
        if starts:
            i = starts[_rank(key) % len(starts)]
            return " ".join(sentences[i:i + size])
    return None


def build_controls(
    chunk: pl.DataFrame, n_controls: int, run_id: str, min_answer_words: int = 1, min_instruction_words: int = 1,
    relevance: Callable[[list[str], list[str]], np.ndarray] | None = None, relevance_model: str = "",
    max_document_chars: int | None = None,
) -> pl.DataFrame:
    """Control twins for `n_controls` of the chunk's pairs (the lowest content hashes of their instantiation ids).
    `chunk`: instantiation_id, doc_id, shard, instruction, answer, relevance_baseline, text (the document), template
    (for the instantiation gates and the fill signals). Rows as CONTROL_SCHEMA before judging (no judgement yet), with
    grounding and fill signals against the answer's own document, relevance of the answer to the instruction, and
    `gate_reason` where a control fails an instantiation gate (it is then not judged, as a real instantiation
    failing it never is)."""
    if chunk.height == 0 or n_controls <= 0:
        return pl.DataFrame(schema=CONTROL_SCHEMA)
    rows = sorted(chunk.to_dicts(), key=lambda r: _rank(r["instantiation_id"]))
    out: list[dict[str, Any]] = []
    for pos, r in enumerate(rows[:n_controls]):
        # swapped: the next pair in hash order from another document with another answer
        donor = next((d for d in rows[pos + 1:] + rows[:pos]
                      if d["doc_id"] != r["doc_id"] and d["answer"].strip() != r["answer"].strip()), None)
        if donor is not None:
            out.append({"control_kind": "swapped", "doc_id": donor["doc_id"], "answer": donor["answer"],
                        "text": donor["text"], "source": donor["instantiation_id"], **_twin(r)})
        shown = truncate(r["text"], max_document_chars) if max_document_chars else r["text"]
        passage = near_miss_passage(shown, r["answer"], r["instantiation_id"], min_answer_words)
        if passage is not None:
            out.append({"control_kind": "near_miss", "doc_id": r["doc_id"], "answer": passage, "text": r["text"],
                        "source": r["doc_id"], **_twin(r)})
    if not out:
        return pl.DataFrame(schema=CONTROL_SCHEMA)
    for c in out:
        c["control_id"] = content_id("control", c["instantiation_id"], c["control_kind"], c["source"], c["answer"])
        c["grounding"] = grounding(c["answer"], c["text"])
        c |= fill_signals(c["instruction"], c["template"], c["text"], c["answer"])  # against the answer's document
        c["gate_reason"] = gate_instantiation(c["instruction"], c["answer"], c.pop("template"), min_instruction_words,
                                              min_answer_words)
        c["run_id"] = run_id
    frame = pl.DataFrame(out).drop("source", "text")
    scores = relevance(frame["instruction"].to_list(), frame["answer"].to_list()) if relevance else None
    frame = frame.with_columns(pl.Series("relevance", scores, dtype=pl.Float64) if scores is not None
                               else pl.lit(None, pl.Float64).alias("relevance"),
                               pl.lit(relevance_model if relevance else None, pl.String).alias("relevance_model"))
    return pl.concat([pl.DataFrame(schema=CONTROL_SCHEMA), frame], how="diagonal_relaxed").select(
        list(CONTROL_SCHEMA)).cast(CONTROL_SCHEMA)  # type: ignore[arg-type]


def _twin(r: dict[str, Any]) -> dict[str, Any]:
    return {"instantiation_id": r["instantiation_id"], "shard": r["shard"], "instruction_doc_id": r["doc_id"],
            "instruction": r["instruction"], "template": r["template"],
            "relevance_baseline": r.get("relevance_baseline")}


def wilson_lower_bound(kept: int, n: int, z: float = 1.96) -> float:
    """The lower end of the Wilson score interval (95% by default) of a kept share: a shard whose bound is above
    the allowed share keeps too many controls beyond chance; a handful of controls proves little either way."""
    if n == 0:
        return 0.0
    p = kept / n
    centre = p + z * z / (2 * n)
    spread = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return max(0.0, (centre - spread) / (1 + z * z / n))


def auc(positive: pl.Series, negative: pl.Series) -> float | None:
    """The probability that a random positive scores above a random negative (ties count half): the Mann-Whitney
    statistic from average ranks, vectorised; None when either side is empty."""
    pos, neg = positive.drop_nulls().cast(pl.Float64), negative.drop_nulls().cast(pl.Float64)
    if pos.len() == 0 or neg.len() == 0:
        return None
    ranks = pl.concat([pos, neg]).rank("average")
    u = float(ranks.head(pos.len()).sum()) - pos.len() * (pos.len() + 1) / 2
    return round(u / (pos.len() * neg.len()), 4)


def control_figures(true: pl.DataFrame, controls: pl.DataFrame) -> dict[str, Any]:
    """`true`: every judged real pair (SIGNALS, kept); `controls`: every judged control (control_kind, SIGNALS,
    kept). Per kind: how many, how many the gates kept, each
    signal's AUC of real over control; the real pairs' kept share; the kept real pairs' relevance AUC over the
    swapped controls and their mean relevance."""
    out: dict[str, Any] = {"true_pairs": true.height, "true_kept": int(true["kept"].sum()) if true.height else 0}
    out["true_kept_share"] = round(out["true_kept"] / true.height, 4) if true.height else None
    kept_true = true.filter(pl.col("kept")) if true.height else true
    out["kept_mean_relevance"] = (round(float(kept_true["relevance"].mean()), 4)  # type: ignore[arg-type]
                                  if kept_true.height and kept_true["relevance"].null_count() < kept_true.height
                                  else None)
    for kind in KINDS:
        c = controls.filter(pl.col("control_kind") == kind) if controls.height else controls
        n, kept = c.height, int(c["kept"].sum()) if c.height else 0
        out[kind] = {"controls": n, "kept": kept, "kept_share": round(kept / n, 4) if n else None,
                     # a signal a table does not hold (written before it was measured) has no AUC
                     **{f"{s}_auc": auc(true[s], c[s]) if true.height and n and s in true.columns and s in c.columns
                        else None for s in SIGNALS}}
    swapped = controls.filter(pl.col("control_kind") == "swapped") if controls.height else controls
    out["kept_relevance_auc_swapped"] = (auc(kept_true["relevance"], swapped["relevance"])
                                         if kept_true.height and swapped.height else None)
    n_all = controls.height
    out["controls"] = n_all
    out["controls_kept"] = int(controls["kept"].sum()) if n_all else 0
    out["controls_kept_share"] = round(out["controls_kept"] / n_all, 4) if n_all else None
    return out
