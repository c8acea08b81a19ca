"""Stage 1, real user queries: normalise, filter, exact-dedup one query source."""

from __future__ import annotations

import re

import polars as pl

from fineinstructions_dagster.config import QueryFilterConfig
from fineinstructions_dagster.lib.ids import content_id_expr
from fineinstructions_dagster.lib.stats import StageStats
from fineinstructions_dagster.stages.decontamination import BenchmarkIndex, remove_overlaps

QUERY_COLUMNS = ["query_id", "source", "source_file", "source_row", "source_id", "text", "run_id"]


def _normalised(col: str) -> pl.Expr:
    return pl.col(col).fill_null("").str.replace_all(r"\s+", " ").str.strip_chars()


def clean_queries(
    raw: pl.DataFrame, source: str, cfg: QueryFilterConfig, run_id: str = "", benchmarks: BenchmarkIndex | None = None
) -> tuple[pl.DataFrame, pl.DataFrame, StageStats]:
    """Return (kept queries, rejected rows with `reason`, stats). Every input row is accounted for. A query that
    shares an n-gram with a `benchmarks` item is removed last (`benchmark_overlap`, naming the item)."""
    stats = StageStats(total=raw.height)
    df = raw.with_columns(_normalised("text").alias("text"))
    words = pl.col("text").str.count_matches(r"\S+")
    blocked = (
        pl.col("text").str.to_lowercase().str.contains(
            r"\b(" + "|".join(re.escape(t.lower()) for t in cfg.blocklist) + r")\b"
        ) if cfg.blocklist else pl.lit(False)
    )
    # First failing rule names the reason; order = cheapest, most common first.
    reason = (
        pl.when(pl.col("text") == "").then(pl.lit("empty"))
        .when(pl.col("text").str.len_chars() < cfg.min_chars).then(pl.lit("too_short"))
        .when(words < cfg.min_words).then(pl.lit("too_few_words"))
        .when(pl.col("text").str.len_chars() > cfg.max_chars).then(pl.lit("too_long"))
        .when(blocked).then(pl.lit("blocklisted"))
        .otherwise(pl.lit(None, pl.String))
    )
    df = df.with_columns(reason.alias("reason"))
    rejected = df.filter(pl.col("reason").is_not_null())
    passed = df.filter(pl.col("reason").is_null()).with_columns(
        pl.col("text").str.to_lowercase().str.replace_all(r"[^\w\s]", "").str.replace_all(r"\s+", " ")
        .alias("_norm")
    )
    is_dup = passed.select(pl.col("_norm").is_duplicated() & ~pl.col("_norm").is_first_distinct()).to_series()
    dups = passed.filter(is_dup).with_columns(pl.lit("duplicate").alias("reason"))
    kept = passed.filter(~is_dup).drop("_norm", "reason")
    rejected = pl.concat([rejected, dups.drop("_norm")], how="vertical")
    stats.drop_counts(rejected["reason"])
    kept = kept.with_columns(
        pl.lit(source).alias("source"),
        pl.lit(run_id).alias("run_id"),
    ).with_columns(content_id_expr("query", "source", "text").alias("query_id")).select(QUERY_COLUMNS)
    stats.kept = kept.height
    stats.check_balanced()
    kept, overlapping = remove_overlaps(kept, benchmarks, ["text"], "query_id", stats)
    rejected = pl.concat([rejected.with_columns(pl.lit(source).alias("source")), overlapping], how="diagonal_relaxed")
    return kept, rejected, stats
