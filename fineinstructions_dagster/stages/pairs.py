"""Stage 7, the dataset: pairs that pass every gate, each carrying the ids of every upstream row and
the Dagster runs that produced them; plus the dataset report."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import duckdb
import numpy as np
import polars as pl

from fineinstructions_dagster.lib.ids import content_id_expr
from fineinstructions_dagster.lib.stats import StageStats
from fineinstructions_dagster.lib.storage import TableStore
from fineinstructions_dagster.stages.decontamination import (
    OVERLAP_COLUMNS,
    OVERLAP_REASON,
    BenchmarkIndex,
    remove_overlaps,
)

PAIR_COLUMNS = [
    "pair_id", "instruction", "answer", "judge_score", "grounding", "relevance", "relevance_baseline",
    "relevance_margin", "relevance_model", "fill_in_document", "fill_in_answer",
    # the gates this pair was selected under (the profile's), so a check by hand needs no settings
    "selected_judge_threshold", "selected_min_grounding", "selected_min_relevance", "selected_min_relevance_margin",
    "selected_min_fill_in_document", "selected_min_fill_in_answer",
    "judgement_id", "instantiation_id", "match_id", "template_id", "query_id", "query_ids", "doc_id",
    "shard", "url", "match_score", "match_rank",
    "instantiator_model", "judge_model",
    # the budgets it was selected under, and its and its document's tokens (null: token budget off)
    "pair_tokens", "document_tokens", "selected_max_pairs_per_document", "selected_max_pair_token_ratio",
    "selected_max_template_share_per_shard",
    "documents_run_id", "matches_run_id", "instantiations_run_id", "judgements_run_id", "template_bank_run_id",
    "run_id",
]


# a final-gate rejection's columns in the pairs' quarantine (with the overlap's or the budgets' where they apply)
REJECTED_COLUMNS = ["judgement_id", "instantiation_id", "reason", "judge_score", "grounding", "relevance",
                    "relevance_margin"]


def relevance_margin() -> pl.Expr:
    """How much more relevant the answer is to its instruction than other documents' answers are on average
    (stages/relevance.RelevanceScorer.baseline): null where either is unmeasured."""
    return (pl.col("relevance") - pl.col("relevance_baseline")).alias("relevance_margin")


@dataclass(frozen=True)
class Gates:
    """The final gates, applied alike to real pairs and to control pairs (stages/controls.py)."""

    judge_threshold: int
    min_grounding: float
    min_relevance: float
    min_fill_in_document: float = 0.0
    min_fill_in_answer: float = 0.0
    min_relevance_margin: float = float("-inf")  # -inf: off (then an unmeasured baseline passes too)

    def reason(self) -> pl.Expr:
        """Why a judged pair (columns judge_score, grounding, relevance, relevance_baseline, fill_in_document,
        fill_in_answer, instruction, answer) fails a gate, or null. A pair without a relevance or fill score fails
        that gate: nothing passes unmeasured."""
        unmeasured = float("-inf")
        margin_on = self.min_relevance_margin > unmeasured
        return (
            pl.when(pl.col("judge_score") < self.judge_threshold).then(pl.lit("below_judge_threshold"))
            .when(pl.col("grounding") < self.min_grounding).then(pl.lit("below_grounding_threshold"))
            .when(pl.col("fill_in_document").fill_null(unmeasured) < self.min_fill_in_document)
            .then(pl.lit("fill_not_in_document"))
            .when(pl.col("fill_in_answer").fill_null(unmeasured) < self.min_fill_in_answer)
            .then(pl.lit("fill_not_in_answer"))
            .when(pl.col("relevance").fill_null(unmeasured) < self.min_relevance)
            .then(pl.lit("below_relevance_threshold"))
            .when(pl.lit(margin_on) & pl.col("relevance_baseline").is_null())
            .then(pl.lit("relevance_baseline_unmeasured"))  # too few other documents' answers in its chunk
            .when(relevance_margin().fill_null(unmeasured) < self.min_relevance_margin)
            .then(pl.lit("below_relevance_margin"))
            .when(pl.col("instruction").str.contains("</?fi>")).then(pl.lit("unfilled_slot"))
            .when(pl.col("answer").str.strip_chars() == "").then(pl.lit("empty_answer"))
            .otherwise(pl.lit(None, pl.String))
        )

    def recorded(self) -> list[pl.Expr]:
        """The thresholds as columns, on every pair and control outcome (a check by hand needs no settings)."""
        return [pl.lit(self.judge_threshold, pl.Int64).alias("selected_judge_threshold"),
                pl.lit(self.min_grounding, pl.Float64).alias("selected_min_grounding"),
                pl.lit(self.min_relevance, pl.Float64).alias("selected_min_relevance"),
                pl.lit(self.min_relevance_margin, pl.Float64).alias("selected_min_relevance_margin"),
                pl.lit(self.min_fill_in_document, pl.Float64).alias("selected_min_fill_in_document"),
                pl.lit(self.min_fill_in_answer, pl.Float64).alias("selected_min_fill_in_answer")]


@dataclass(frozen=True)
class Budgets:
    """How much of the dataset one document, and one template, may supply, applied to the pairs that pass every
    gate, best-judged first (judge score, then grounding, then relevance, then pair id): a document keeps at most
    `max_pairs` pairs holding no more tokens than `max_token_ratio` times its own; then no template keeps more than
    `max_template_share` of the shard's pairs. 0: no cap."""

    max_pairs: int = 0
    max_token_ratio: float = 0.0
    max_template_share: float = 0.0

    @property
    def per_document(self) -> bool:
        return self.max_pairs > 0 or self.max_token_ratio > 0

    @property
    def counts_tokens(self) -> bool:
        return self.max_token_ratio > 0

    def recorded(self) -> list[pl.Expr]:
        return [pl.lit(self.max_pairs, pl.Int64).alias("selected_max_pairs_per_document"),
                pl.lit(self.max_token_ratio, pl.Float64).alias("selected_max_pair_token_ratio"),
                pl.lit(self.max_template_share, pl.Float64).alias("selected_max_template_share_per_shard")]


# a document's or template's best-judged pairs first: the order the budgets keep them in
BEST_FIRST = ["judge_score", "grounding", "relevance", "pair_id"]
BEST_FIRST_DESCENDING = [True, True, True, False]


def template_cap(counts: np.ndarray, max_share: float) -> int:
    """The most pairs one template may keep in a shard whose templates have `counts` pairs each, so that no
    template holds more than `max_share` of what the shard keeps: the largest c with c <= max_share x
    sum(min(count, c)) (the set of such c is 0..c*, as c - max_share x kept(c) is convex), at least 1 (a template
    keeps its best pair: a shard of few templates is capped no lower)."""
    if max_share <= 0 or counts.size == 0:
        return int(counts.max(initial=0))
    ranked = np.sort(counts)
    below = np.concatenate([[0], np.cumsum(ranked)])  # pairs of the templates with fewer than c
    caps = np.arange(1, int(ranked[-1]) + 1)
    at = np.searchsorted(ranked, caps, side="left")
    kept = below[at] + caps * (ranked.size - at)
    ok = caps[caps <= max_share * kept]
    return int(ok[-1]) if ok.size else 1


def over_template_share(pairs: pl.DataFrame, max_share: float) -> pl.DataFrame:
    """Per pair (pair_id): `over_template_share` past the first `template_cap` pairs of its template in the shard
    (best-judged first), else null."""
    counts = pairs.group_by("template_id").len()["len"].to_numpy()
    cap = template_cap(counts, max_share)
    rank = pl.int_range(1, pl.len() + 1).over("template_id")
    return (pairs.select("template_id", *BEST_FIRST)
            .sort(BEST_FIRST, descending=BEST_FIRST_DESCENDING, nulls_last=True)
            .select("pair_id", pl.when(rank > cap).then(pl.lit("over_template_share")).otherwise(None)
                    .cast(pl.String).alias("reason")))


def over_document_budgets(pairs: pl.DataFrame, pair_tokens: pl.Series, document_tokens: pl.DataFrame,
                          budgets: Budgets) -> pl.DataFrame:
    """Per pair (pair_id): `pair_tokens` (its instruction's and answer's tokens, aligned with `pairs`), the
    document's tokens (`document_tokens`: doc_id, document_tokens) and the reason it is over a budget, or null:
    `over_pairs_per_document` past the first max_pairs of its document, `over_document_tokens` once the pairs
    before it and itself hold more tokens than max_token_ratio x the document's. Ranked best first, so the pairs
    kept are the best of their document and the cut is a prefix (tokens only grow)."""
    ranked = (pairs.select("pair_id", "doc_id", "judge_score", "grounding", "relevance")
              .with_columns(pair_tokens.alias("pair_tokens"))
              .join(document_tokens, on="doc_id", how="left")
              .sort(["doc_id", *BEST_FIRST], descending=[False, *BEST_FIRST_DESCENDING], nulls_last=True))
    rank = pl.int_range(1, pl.len() + 1).over("doc_id")
    tokens_so_far = pl.col("pair_tokens").cum_sum().over("doc_id")
    reason = (pl.when(pl.lit(budgets.max_pairs > 0) & (rank > budgets.max_pairs))
              .then(pl.lit("over_pairs_per_document"))
              .when(pl.lit(budgets.max_token_ratio > 0)
                    & (tokens_so_far > pl.col("document_tokens") * budgets.max_token_ratio))
              .then(pl.lit("over_document_tokens"))
              .otherwise(pl.lit(None, pl.String)))
    return ranked.select("pair_id", "pair_tokens", "document_tokens", reason.alias("reason"))


def select_pairs(
    judgements: pl.DataFrame, instantiations: pl.DataFrame, matches: pl.DataFrame, documents: pl.DataFrame,
    bank: pl.DataFrame, gates: Gates, run_id: str = "", benchmarks: BenchmarkIndex | None = None,
    budgets: Budgets = Budgets(), count_tokens: Callable[[list[str]], list[int]] | None = None,
) -> tuple[pl.DataFrame, pl.DataFrame, StageStats]:
    """Join every stage's row for each judged pair and apply the final gates; then a pair whose instruction or
    answer shares an n-gram with a `benchmarks` item is removed (`benchmark_overlap`, naming the item); last, each
    document's `budgets` (`count_tokens`: texts -> their token counts, the export tokenizer's). The template
    share cap is the whole shard's (`cap_template_share`, after this). `documents` must hold the documents' text
    when the token budget is on. Returns (pairs, rejected with reason, stats)."""
    stats = StageStats(total=judgements.height)
    # No early return for an empty shard: the same joins over the (typed) empty inputs give the same column
    # types as a full shard, so dbt and the report read every shard alike.
    j = judgements.select("judgement_id", "instantiation_id", pl.col("score").alias("judge_score"),
                          pl.col("model").alias("judge_model"), pl.col("run_id").alias("judgements_run_id"))
    i = instantiations.select("instantiation_id", "match_id", "instruction", "answer", "grounding", "relevance",
                              "relevance_baseline", "relevance_model", "fill_in_document", "fill_in_answer",
                              pl.col("model").alias("instantiator_model"),
                              pl.col("run_id").alias("instantiations_run_id"))
    m = matches.select("match_id", "doc_id", "template_id", pl.col("score").alias("match_score"),
                       pl.col("rank").alias("match_rank"), pl.col("run_id").alias("matches_run_id"))
    d = documents.select("doc_id", "shard", "url", pl.col("run_id").alias("documents_run_id"))
    b = bank.select("template_id", "template", pl.col("query_ids"),
                    pl.col("query_ids").list.first().alias("query_id"),
                    pl.col("run_id").alias("template_bank_run_id"))
    df = (j.join(i, on="instantiation_id", how="left").join(m, on="match_id", how="left")
          .join(d, on="doc_id", how="left").join(b, on="template_id", how="left"))
    reason = (
        pl.when(pl.col("instruction").is_null() | pl.col("match_id").is_null()).then(pl.lit("broken_lineage"))
        .when(pl.col("url").is_null() & pl.col("shard").is_null()).then(pl.lit("broken_lineage"))
        .when(pl.col("template").is_null()).then(pl.lit("broken_lineage"))
        .otherwise(gates.reason())
    )
    df = df.with_columns(reason.alias("reason"), relevance_margin())
    rejected = df.filter(pl.col("reason").is_not_null())
    pairs = (
        df.filter(pl.col("reason").is_null())
        .with_columns(content_id_expr("pair", "instantiation_id", "judgement_id").alias("pair_id"),
                      pl.lit(run_id).alias("run_id"), *gates.recorded(), *budgets.recorded(),
                      pl.lit(None, pl.Int64).alias("pair_tokens"), pl.lit(None, pl.Int64).alias("document_tokens"))
        .select(PAIR_COLUMNS).sort("pair_id")
    )
    stats.drop_counts(rejected["reason"])
    stats.kept = pairs.height
    stats.check_balanced()
    pairs, overlapping = remove_overlaps(pairs, benchmarks, ["instruction", "answer"], "pair_id", stats)
    pairs, over_budget = apply_document_budgets(pairs, documents, budgets, count_tokens, stats)
    return pairs, pl.concat([rejected.select(REJECTED_COLUMNS), overlapping.select(*REJECTED_COLUMNS, *OVERLAP_COLUMNS),
                             over_budget.select(*REJECTED_COLUMNS, "pair_tokens", "document_tokens")],
                            how="diagonal_relaxed"), stats


def apply_document_budgets(pairs: pl.DataFrame, documents: pl.DataFrame, budgets: Budgets,
                           count_tokens: Callable[[list[str]], list[int]] | None,
                           stats: StageStats) -> tuple[pl.DataFrame, pl.DataFrame]:
    """(the pairs within their documents' budgets, with pair_tokens and document_tokens where the token budget is
    on; the others with `reason`); `stats` (balanced) moves the others from kept to dropped by reason."""
    if not budgets.per_document or pairs.height == 0:
        return pairs, pairs.clear().with_columns(pl.lit(None, pl.String).alias("reason"), pl.lit(None, pl.Float64)
                                                 .alias("relevance_margin"))
    if budgets.counts_tokens:
        if count_tokens is None:
            raise ValueError("the token budget is on but no tokenizer was given (count_tokens)")
        pair_tokens = pl.Series([a + b for a, b in zip(count_tokens(pairs["instruction"].to_list()),
                                                       count_tokens(pairs["answer"].to_list()), strict=True)],
                                dtype=pl.Int64)
        docs = documents.filter(pl.col("doc_id").is_in(pairs["doc_id"].unique().implode())).unique("doc_id")
        doc_tokens = docs.select("doc_id", pl.Series("document_tokens", count_tokens(docs["text"].to_list()),
                                                     dtype=pl.Int64))
    else:
        pair_tokens = pl.Series([None] * pairs.height, dtype=pl.Int64)
        doc_tokens = pl.DataFrame(schema={"doc_id": pl.String, "document_tokens": pl.Int64})
    verdict = over_document_budgets(pairs, pair_tokens, doc_tokens, budgets)
    marked = pairs.drop("pair_tokens", "document_tokens").join(verdict, on="pair_id", how="left",
                                                               maintain_order="left")
    over = marked.filter(pl.col("reason").is_not_null()).with_columns(relevance_margin())
    stats.kept -= over.height
    stats.drop_counts(over["reason"])
    stats.check_balanced()
    return marked.filter(pl.col("reason").is_null()).select(PAIR_COLUMNS), over


def template_share_overflow(pairs: pl.DataFrame | pl.LazyFrame, max_share: float) -> pl.DataFrame:
    """The pairs of a whole shard (after every other gate and budget) that its template's share cap drops, as
    quarantine rows (REJECTED_COLUMNS and the tokens, reason `over_template_share`). Applied once per shard, not
    per chunk: a template's pairs span the shard. Reads only the columns it needs (not the texts)."""
    pairs = pairs.lazy().select("pair_id", "template_id", *(c for c in REJECTED_COLUMNS if c != "reason"),
                                "pair_tokens", "document_tokens")
    pairs = pairs.collect() if max_share > 0 else pairs.head(0).collect()
    verdict = over_template_share(pairs, max_share)
    return (pairs.join(verdict.filter(pl.col("reason").is_not_null()), on="pair_id", how="inner",
                       maintain_order="left")
            .select(*REJECTED_COLUMNS, "pair_tokens", "document_tokens"))


def cap_template_share(pairs: pl.DataFrame, max_share: float,
                       stats: StageStats) -> tuple[pl.DataFrame, pl.DataFrame]:
    """(the shard's pairs within the template share cap; the others, as `template_share_overflow`); `stats`
    (balanced) moves the others from kept to dropped."""
    over = template_share_overflow(pairs, max_share)
    stats.kept -= over.height
    stats.drop_counts(over["reason"])
    stats.check_balanced()
    return pairs.join(over.select("judgement_id"), on="judgement_id", how="anti", maintain_order="left"), over


CONTROL_OUTCOME_COLUMNS = [
    "control_id", "instantiation_id", "control_kind", "shard", "instruction_doc_id", "doc_id", "judgement_id",
    "judge_score", "grounding", "relevance", "relevance_baseline", "relevance_margin", "fill_in_document",
    "fill_in_answer", "judged", "kept", "reason", "selected_judge_threshold", "selected_min_grounding",
    "selected_min_relevance", "selected_min_relevance_margin", "selected_min_fill_in_document",
    "selected_min_fill_in_answer", "run_id",
]


def gate_controls(controls: pl.DataFrame, gates: Gates, run_id: str = "") -> tuple[pl.DataFrame, StageStats]:
    """The control pairs (stages/controls.CONTROL_SCHEMA, judged) through the same gates as the real pairs: the
    instantiation gate it failed, else why its judgement was quarantined, else the final gates' reason. Returns
    (one outcome row per control: kept, reason; stats with `total` = controls, `kept` = controls the gates let
    through, which must be few)."""
    df = controls.rename({"score": "judge_score"}).with_columns(
        relevance_margin(), pl.coalesce(pl.col("gate_reason"), pl.col("judge_reason"), gates.reason()).alias("reason"))
    out = (df.with_columns(pl.col("reason").is_null().alias("kept"), pl.col("gate_reason").is_null().alias("judged"),
                           pl.lit(run_id).alias("run_id"), *gates.recorded())
           .select(CONTROL_OUTCOME_COLUMNS).sort("control_id"))
    stats = StageStats(total=out.height, kept=int(out["kept"].sum()))
    stats.drop_counts(out.filter(~pl.col("kept"))["reason"])
    stats.check_balanced()
    return out, stats


def sampled_true_pairs(instantiations: Path, judgements: Path, pairs: Path, ids: pl.Series) -> pl.DataFrame:
    """The real pairs whose instantiation_id is one of `ids` (the controls' originals): judge_score (null where
    the judgement was quarantined), grounding, relevance and its margin, the fill signals, and whether it became a
    pair (`kept`)."""
    wanted = ids.drop_nulls().unique().implode()
    inst = (pl.scan_parquet(instantiations)
            .select("instantiation_id", "grounding", "relevance", "relevance_baseline", relevance_margin(),
                    "fill_in_document", "fill_in_answer")
            .filter(pl.col("instantiation_id").is_in(wanted)))
    judged = (pl.scan_parquet(judgements).select("instantiation_id", pl.col("score").alias("judge_score"))
              .filter(pl.col("instantiation_id").is_in(wanted)))
    kept = (pl.scan_parquet(pairs).select("instantiation_id").filter(pl.col("instantiation_id").is_in(wanted))
            .with_columns(pl.lit(True).alias("kept")))
    return (inst.join(judged, on="instantiation_id", how="left").join(kept, on="instantiation_id", how="left")
            .with_columns(pl.col("kept").fill_null(False)).collect())


def shard_controls(store: TableStore, shard: str) -> tuple[pl.DataFrame, pl.DataFrame]:
    """(real, controls) for stages/controls.control_figures: the shard's judged controls, and as the real side the
    pairs they are twins of (a content-hash sample of the judged pairs, so memory follows the controls, not the
    shard) with whether each became a pair."""
    outcomes = pl.read_parquet(store.path("control_outcomes", shard)).filter(pl.col("judged"))
    true = sampled_true_pairs(store.path("instantiations", shard), store.path("judgements", shard),
                              store.path("fineinstructions", shard), outcomes["instantiation_id"].unique())
    return true, outcomes


def dataset_report(pairs: pl.DataFrame) -> dict[str, object]:
    """Counts, template diversity and score histograms over all final pairs."""
    if pairs.height == 0:
        return {"pairs": 0, "documents": 0, "templates": 0, "shards": 0}
    usage = pairs.group_by("template_id").len().sort("len", descending=True)
    return {
        "pairs": pairs.height,
        "documents": pairs["doc_id"].n_unique(),
        "templates": usage.height,
        "shards": pairs["shard"].n_unique(),
        "top_template_share": float(usage["len"][0] / pairs.height),
        "pairs_per_document": float(pairs.height / pairs["doc_id"].n_unique()),
        "judge_score_histogram": {int(s): int(n) for s, n in
                                  pairs.group_by("judge_score").len().sort("judge_score").iter_rows()},
        "grounding_histogram": {f"{lo:.1f}-{lo + 0.2:.1f}": int(n) for lo, n in
                                pairs.select((pl.col("grounding") * 5).floor().clip(0, 4).alias("b") / 5)
                                .group_by("b").len().sort("b").iter_rows()},
        "mean_grounding": float(pairs["grounding"].mean()),  # type: ignore[arg-type]
    }


QUARANTINED_TABLES = ("user_queries", "templates", "filtered_documents", "documents", "instantiations", "judgements",
                      "fineinstructions")


def _quarantine_counts(store: TableStore, column: str, only_reason: str | None = None) -> dict[str, dict[str, int]]:
    """Quarantined rows by table and `column` across every partition (DuckDB unions differing schemas); only
    rows of `only_reason` when given. A table whose quarantine lacks the column is left out."""
    out: dict[str, dict[str, int]] = {}
    con = duckdb.connect()
    for table in QUARANTINED_TABLES:
        source = store.glob_if_any(table, quarantine=True)
        if source is None:
            continue
        rel = con.execute("SELECT * FROM read_parquet(?, union_by_name=true) LIMIT 0", [source])
        if column not in [d[0] for d in rel.description]:
            continue
        where, params = ("WHERE reason = ?", [only_reason]) if only_reason else ("", [])
        rows = con.execute(f"SELECT {column}, count(*) FROM read_parquet(?, union_by_name=true) {where} "
                           f"GROUP BY {column} ORDER BY {column}", [source, *params]).fetchall()
        if rows:
            out[table] = {str(v): int(n) for v, n in rows}
    return out


def benchmark_overlap_counts(store: TableStore) -> dict[str, dict[str, int]]:
    """Rows removed for sharing an n-gram with a benchmark, by table and benchmark, across every partition."""
    return _quarantine_counts(store, "benchmark", OVERLAP_REASON)


def rejection_counts(store: TableStore) -> dict[str, dict[str, int]]:
    """Quarantined rows by table and reason across every partition."""
    return _quarantine_counts(store, "reason")
