"""Quality figures per LLM stage for the dataset report: how often the model's output parsed and needed a repair,
slots per template, the grounding and judge-score distributions, whether the judge tells grounded answers from
ungrounded ones, how many pairs the paper's gates would keep, and a few samples of each stage."""

from __future__ import annotations

from typing import Any

import polars as pl

# Quarantine reasons that mean the output's form was wrong (it did not parse), not its content.
PARSE_FAILURES = frozenset({"unparseable_json", "truncated_output", "missing_field", "not_an_object",
                            "duplicate_key", "malformed_flow_output", "generation_failed"})
REPAIR_MARK = "That output could not be used"  # the repair turn's text (stages/llm_calls.repair_request)
SAMPLES = 5


def _rates(kept: pl.LazyFrame, reasons: dict[str, int]) -> dict[str, Any]:
    counts = kept.select(pl.len().alias("n"),
                         pl.col("prompt").str.contains(REPAIR_MARK, literal=True).sum().alias("repaired")).collect()
    n_kept, repaired = int(counts["n"][0]), int(counts["repaired"][0] or 0)
    total = n_kept + sum(reasons.values())
    unparsed = sum(n for r, n in reasons.items() if r in PARSE_FAILURES)
    return {"outputs": total, "kept": n_kept,
            "parse_rate": round((total - unparsed) / total, 3) if total else None,
            "repair_rate": round(repaired / total, 3) if total else None,
            "quarantined": dict(sorted(reasons.items(), key=lambda kv: -kv[1]))}


def _histogram(values: pl.Series, edges: tuple[float, ...] = (0.0, 0.2, 0.4, 0.6, 0.8)) -> dict[str, int]:
    bins = {f"{lo:.1f}+": 0 for lo in edges}
    for v in values.drop_nulls():
        lo = max(e for e in edges if v >= e) if v >= edges[0] else edges[0]
        bins[f"{lo:.1f}+"] += 1
    return bins


def _samples(frame: pl.DataFrame, by: str, columns: list[str], clip: int = 160) -> list[dict[str, Any]]:
    rows = frame.sort(by).head(SAMPLES).select(columns).to_dicts()
    return [{k: (v[:clip] + "...") if isinstance(v, str) and len(v) > clip else v for k, v in r.items()}
            for r in rows]


def stage_quality(templates: pl.LazyFrame | None, instantiations: pl.LazyFrame | None,
                  judgements: pl.LazyFrame | None, pairs: pl.DataFrame, rejections: dict[str, dict[str, int]],
                  judge_threshold: int, min_grounding: float, paper_gates: dict[str, float]) -> dict[str, Any]:
    """The per-stage figures; `paper_gates`: judge_threshold, min_grounding, min_instruction_words,
    min_answer_words of the paper profile, to count what it would keep of the same judged pairs."""
    out: dict[str, Any] = {}
    if templates is not None:
        t = templates.select("query_id", "query_text", "template", "n_slots").collect()
        out["templates"] = {**_rates(templates, rejections.get("templates", {})),
                            "slots_per_template": {int(k): int(n) for k, n in
                                                   t.group_by("n_slots").len().sort("n_slots").iter_rows()},
                            "samples": _samples(t, "query_id", ["query_text", "template"])}
    if instantiations is None:
        return out
    inst = instantiations.select("instantiation_id", "instruction", "answer", "grounding").collect()
    words = inst.select("instantiation_id", "grounding",
                        pl.col("instruction").str.count_matches(r"\w+").alias("instruction_words"),
                        pl.col("answer").str.count_matches(r"\w+").alias("answer_words"))
    out["instantiations"] = {
        **_rates(instantiations, rejections.get("instantiations", {})),
        "grounding_histogram": _histogram(inst["grounding"]),
        "mean_grounding": round(float(inst["grounding"].mean() or 0.0), 3),
        "median_answer_words": float(words["answer_words"].median() or 0),
        "samples": _samples(inst, "instantiation_id", ["instruction", "answer", "grounding"]),
    }
    if judgements is None:
        return out
    judged = judgements.select("instantiation_id", "score", "feedback").collect().join(words, on="instantiation_id")
    low = judged.filter(pl.col("grounding") < min_grounding)
    corr = (judged.select(pl.corr("score", "grounding")).item()
            if judged.height > 2 and judged["score"].n_unique() > 1 and judged["grounding"].n_unique() > 1 else None)
    paper = judged.filter((pl.col("score") >= paper_gates["judge_threshold"])
                          & (pl.col("grounding") >= paper_gates["min_grounding"])
                          & (pl.col("instruction_words") >= paper_gates["min_instruction_words"])
                          & (pl.col("answer_words") >= paper_gates["min_answer_words"]))
    out["judgements"] = {
        **_rates(judgements, rejections.get("judgements", {})),
        "score_histogram": {int(s): int(n) for s, n in judged.group_by("score").len().sort("score").iter_rows()},
        # The judge's agreement with grounding: a useful judge rarely scores an ungrounded answer high.
        "score_grounding_correlation": None if corr is None else round(float(corr), 3),
        "low_grounding_pairs": low.height,
        "low_grounding_scored_at_or_above_threshold": low.filter(pl.col("score") >= judge_threshold).height,
        "samples": _samples(judged, "instantiation_id", ["score", "feedback"]),
    }
    out["gates"] = {"pairs_kept_by_this_profile": pairs.height, "pairs_the_paper_gates_would_keep": paper.height,
                    "judged_pairs": judged.height}
    if pairs.height:
        out["pairs"] = {"samples": _samples(pairs, "pair_id", ["instruction", "answer", "judge_score", "grounding"])}
    return out
