"""Corpus documents: quality filters and exact dedup for one corpus shard.

Today: length bounds, Gopher-style word statistics, exact dedup of whitespace/case-normalised text
within the shard. Every dropped document is kept in the rejected table with its reason.
"""

from __future__ import annotations

import polars as pl

from fineinstructions_dagster.config import DocumentFilterConfig
from fineinstructions_dagster.lib.ids import content_id_expr
from fineinstructions_dagster.lib.stats import StageStats

DOCUMENT_COLUMNS = ["doc_id", "shard", "source_file", "source_row", "source_id", "url", "text", "n_words",
                    "text_hash", "metadata", "run_id"]


def document_features(df: pl.DataFrame) -> pl.DataFrame:
    words = pl.col("text").str.extract_all(r"\S+")
    return df.with_columns(
        pl.col("text").fill_null("").str.strip_chars().alias("text"),
    ).with_columns(
        words.list.len().alias("n_words"),
        words.list.eval(pl.element().str.len_chars()).list.mean().fill_null(0).alias("mean_word_length"),
        (words.list.eval(pl.element().str.contains(r"[^\W\d_]")).list.sum()
         / pl.max_horizontal(words.list.len(), 1)).alias("alpha_word_ratio"),
        ((pl.col("text").str.count_matches("#") + pl.col("text").str.count_matches(r"\.\.\.|…"))
         / pl.max_horizontal(words.list.len(), 1)).alias("symbol_word_ratio"),
    )


def filter_documents(
    raw: pl.DataFrame, shard: str, cfg: DocumentFilterConfig, run_id: str = ""
) -> tuple[pl.DataFrame, pl.DataFrame, StageStats]:
    """Return (kept documents, rejected documents with `reason`, stats)."""
    stats = StageStats(total=raw.height)
    df = document_features(raw)
    reason = (
        pl.when(pl.col("text") == "").then(pl.lit("empty"))
        .when(pl.col("n_words") < cfg.min_words).then(pl.lit("too_short"))
        .when(pl.col("n_words") > cfg.max_words).then(pl.lit("too_long"))
        .when(pl.col("mean_word_length") < cfg.min_mean_word_length).then(pl.lit("short_words"))
        .when(pl.col("mean_word_length") > cfg.max_mean_word_length).then(pl.lit("long_words"))
        .when(pl.col("alpha_word_ratio") < cfg.min_alpha_word_ratio).then(pl.lit("few_alpha_words"))
        .when(pl.col("symbol_word_ratio") > cfg.max_symbol_word_ratio).then(pl.lit("symbol_heavy"))
        .otherwise(pl.lit(None, pl.String))
    )
    df = df.with_columns(
        reason.alias("reason"),
        pl.lit(shard).alias("shard"),
        pl.lit(run_id).alias("run_id"),
        pl.col("text").str.to_lowercase().str.replace_all(r"\s+", " ").alias("_norm"),
    ).with_columns(content_id_expr("hash", "_norm").alias("text_hash")).drop("_norm")
    passed = df.filter(pl.col("reason").is_null())
    first = passed.select(pl.col("text_hash").is_first_distinct()).to_series()
    dup_of = passed.group_by("text_hash", maintain_order=True).agg(pl.col("source_row").first().alias("_first"))
    dups = passed.filter(~first).join(dup_of, on="text_hash", how="left").with_columns(
        pl.lit("exact_duplicate").alias("reason"),
        pl.concat_str(pl.lit("source_row "), pl.col("_first").cast(pl.String)).alias("duplicate_of"),
    ).drop("_first")
    kept = passed.filter(first).with_columns(
        content_id_expr("doc", "shard", "source_file", "source_id", "url", "text").alias("doc_id")
    ).select(DOCUMENT_COLUMNS)
    rejected = pl.concat(
        [df.filter(pl.col("reason").is_not_null()).with_columns(pl.lit(None, pl.String).alias("duplicate_of")),
         dups], how="vertical_relaxed",
    )
    stats.drop_counts(rejected["reason"])
    stats.kept = kept.height
    stats.check_balanced()
    return kept, rejected, stats
