"""Corpus documents: line-level boilerplate removal, Gopher quality and repetition filters, language ID
and a domain blocklist, one batch of a corpus shard at a time. Dedup (exact and near, across shards)
happens afterwards over every shard's signatures: see `dedup.py`.

Every rule is a Polars expression over the batch except language ID (CLD2, one C call per document).
Every dropped document gets a reason; the first failing rule names it.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import polars as pl

from fineinstructions_dagster.config import DocumentFilterConfig
from fineinstructions_dagster.lib.formats import ReadReport, iter_text_batches, malformed_frame
from fineinstructions_dagster.lib.ids import content_id_expr
from fineinstructions_dagster.lib.stats import StageStats
from fineinstructions_dagster.stages.decontamination import BenchmarkIndex, remove_overlaps
from fineinstructions_dagster.stages.dedup import DECISION_SCHEMA, MinhashConfig, shard_signatures

DOCUMENT_SCHEMA: dict[str, pl.DataType] = {
    "doc_id": pl.String(), "shard": pl.String(), "source_file": pl.String(), "source_row": pl.Int64(),
    "source_id": pl.String(), "url": pl.String(), "text": pl.String(), "n_words": pl.UInt32(),
    "text_hash": pl.String(), "language": pl.String(), "language_score": pl.Float64(), "metadata": pl.String(),
    "run_id": pl.String(),
}
DOCUMENT_COLUMNS = list(DOCUMENT_SCHEMA)
STOP_WORDS = ["the", "be", "to", "of", "and", "that", "have", "with"]  # Gopher's stop-word rule
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")


def remove_boilerplate_lines(df: pl.DataFrame, pattern: str | None) -> pl.DataFrame:
    """Drop lines that match the boilerplate pattern (cookie banners, 'all rights reserved', ...);
    records the share of non-empty lines removed."""
    if not pattern:
        return df.with_columns(pl.lit(0.0).alias("boilerplate_line_fraction"))
    lines = pl.col("text").fill_null("").str.split("\n")
    nonempty = lines.list.eval(pl.element().filter(pl.element().str.strip_chars() != ""))
    kept = lines.list.eval(pl.element().filter(~pl.element().str.contains(pattern)))
    n_lines = nonempty.list.len()
    n_bad = nonempty.list.eval(pl.element().str.contains(pattern)).list.sum()
    return df.with_columns(
        kept.list.join("\n").str.strip_chars().alias("text"),
        (n_bad / pl.max_horizontal(n_lines, 1)).cast(pl.Float64).alias("boilerplate_line_fraction"),
    )


def _dup_fractions(parts: pl.Expr, prefix: str) -> list[pl.Expr]:
    """Gopher repetition: share of repeated items, and share of characters in repeated items."""
    items = parts.list.eval(pl.element().str.strip_chars()).list.eval(pl.element().filter(pl.element() != ""))
    repeated = items.list.eval(pl.element().filter(~pl.element().is_first_distinct()))
    total_chars = items.list.eval(pl.element().str.len_chars()).list.sum()
    return [
        (repeated.list.len() / pl.max_horizontal(items.list.len(), 1)).alias(f"dup_{prefix}_fraction"),
        (repeated.list.eval(pl.element().str.len_chars()).list.sum() / pl.max_horizontal(total_chars, 1))
        .alias(f"dup_{prefix}_char_fraction"),
    ]


def document_features(df: pl.DataFrame) -> pl.DataFrame:
    words = pl.col("text").str.extract_all(r"\S+")
    n_words = pl.max_horizontal(words.list.len(), 1)
    lines = pl.col("text").str.split("\n").list.eval(pl.element().filter(pl.element().str.strip_chars() != ""))
    n_lines = pl.max_horizontal(lines.list.len(), 1)
    lower = pl.col("text").str.to_lowercase()
    return df.with_columns(
        words.list.len().alias("n_words"),
        words.list.eval(pl.element().str.len_chars()).list.mean().fill_null(0).alias("mean_word_length"),
        (words.list.eval(pl.element().str.contains(r"[^\W\d_]")).list.sum() / n_words).alias("alpha_word_ratio"),
        ((pl.col("text").str.count_matches("#") + pl.col("text").str.count_matches(r"\.\.\.|…")) / n_words)
        .alias("symbol_word_ratio"),
        (lines.list.eval(pl.element().str.contains(r"^\s*[•●‣◦▪\-\*]")).list.sum() / n_lines)
        .alias("bullet_line_ratio"),
        (lines.list.eval(pl.element().str.contains(r"(\.\.\.|…)\s*$")).list.sum() / n_lines)
        .alias("ellipsis_line_ratio"),
        lower.str.extract_all(r"\b(" + "|".join(STOP_WORDS) + r")\b").list.len().alias("stop_words"),
        *_dup_fractions(pl.col("text").str.split("\n"), "line"),
        *_dup_fractions(pl.col("text").str.split("\n\n"), "para"),
    )


def detect_languages(texts: list[str]) -> tuple[list[str], list[float]]:
    """(ISO code or 'un', share of the text in that language) per text, with CLD2 (compiled-in model)."""
    import pycld2

    langs, scores = [], []
    for t in texts:
        try:
            clean = _CONTROL.sub(" ", t[:20_000]).encode("utf-8", "replace").decode("utf-8")
            reliable, _, found = pycld2.detect(clean)
        except pycld2.error:  # text CLD2 cannot read: unknown language, not a crash
            reliable, found = False, ()
        code, percent = (found[0][1], found[0][2]) if found else ("un", 0)
        langs.append(code if reliable and code != "un" else "un")
        scores.append(percent / 100.0)
    return langs, scores


def _url_domain() -> pl.Expr:
    return pl.col("url").fill_null("").str.extract(r"^[a-zA-Z][a-zA-Z0-9+.-]*://(?:[^@/]*@)?([^/:?#]+)", 1) \
        .str.to_lowercase().str.strip_prefix("www.")


def rejection_reason(cfg: DocumentFilterConfig) -> pl.Expr:
    """Every rule except language ID (cheap, vectorised); the first failing rule names the reason."""
    rules: list[tuple[pl.Expr, str]] = []
    if cfg.blocked_domains:
        blocked = [d.lower().removeprefix("www.") for d in cfg.blocked_domains]
        rules.append((_url_domain().is_in(blocked), "blocked_domain"))
    rules += [
        (pl.col("boilerplate_line_fraction") > cfg.max_boilerplate_line_fraction, "boilerplate"),
        (pl.col("text") == "", "empty"),
        (pl.col("n_words") < cfg.min_words, "too_short"),
        (pl.col("n_words") > cfg.max_words, "too_long"),
        (pl.col("mean_word_length") < cfg.min_mean_word_length, "short_words"),
        (pl.col("mean_word_length") > cfg.max_mean_word_length, "long_words"),
    ]
    optional = [
        (cfg.min_alpha_word_ratio, pl.col("alpha_word_ratio") < (cfg.min_alpha_word_ratio or 0), "few_alpha_words"),
        (cfg.max_symbol_word_ratio, pl.col("symbol_word_ratio") > (cfg.max_symbol_word_ratio or 0), "symbol_heavy"),
        (cfg.max_bullet_line_ratio, pl.col("bullet_line_ratio") > (cfg.max_bullet_line_ratio or 0), "bullet_lines"),
        (cfg.max_ellipsis_line_ratio, pl.col("ellipsis_line_ratio") > (cfg.max_ellipsis_line_ratio or 0),
         "ellipsis_lines"),
        (cfg.min_stop_words, pl.col("stop_words") < (cfg.min_stop_words or 0), "few_stop_words"),
        (cfg.max_dup_para_fraction, pl.col("dup_para_fraction") > (cfg.max_dup_para_fraction or 0),
         "repeated_paragraphs"),
        (cfg.max_dup_line_fraction, pl.col("dup_line_fraction") > (cfg.max_dup_line_fraction or 0),
         "repeated_lines"),
        (cfg.max_dup_para_char_fraction,
         pl.col("dup_para_char_fraction") > (cfg.max_dup_para_char_fraction or 0), "repeated_paragraph_chars"),
        (cfg.max_dup_line_char_fraction,
         pl.col("dup_line_char_fraction") > (cfg.max_dup_line_char_fraction or 0), "repeated_line_chars"),
    ]
    rules += [(cond, reason) for threshold, cond, reason in optional if threshold is not None]
    expr = pl.when(rules[0][0]).then(pl.lit(rules[0][1]))
    for cond, reason in rules[1:]:
        expr = expr.when(cond).then(pl.lit(reason))
    return expr.otherwise(pl.lit(None, pl.String))


def filter_documents(
    raw: pl.DataFrame, shard: str, cfg: DocumentFilterConfig, run_id: str = "",
    benchmarks: BenchmarkIndex | None = None,
) -> tuple[pl.DataFrame, pl.DataFrame, StageStats]:
    """One batch of a shard -> (kept documents, rejected documents with `reason`, stats). A document every rule
    kept that shares an n-gram with a `benchmarks` item is removed last (`benchmark_overlap`, naming the item)."""
    stats = StageStats(total=raw.height)
    df = document_features(remove_boilerplate_lines(raw.with_columns(pl.col("text").fill_null("")),
                                                    cfg.boilerplate_line_pattern))
    df = df.with_columns(rejection_reason(cfg).alias("reason"))
    if cfg.languages:
        # Language ID (the costliest rule, last in order) only for documents that pass every other rule.
        pending = df["reason"].is_null()
        langs, scores = detect_languages(df.filter(pending)["text"].to_list())
        it_l, it_s = iter(langs), iter(scores)
        df = df.with_columns(
            pl.Series("language", [next(it_l) if p else None for p in pending], dtype=pl.String),
            pl.Series("language_score", [next(it_s) if p else None for p in pending], dtype=pl.Float64),
        ).with_columns(
            pl.when(pl.col("reason").is_null() & (~pl.col("language").is_in(list(cfg.languages))
                                                  | (pl.col("language_score") < cfg.min_language_score)))
            .then(pl.lit("language")).otherwise(pl.col("reason")).alias("reason")
        )
    else:
        df = df.with_columns(pl.lit(None, pl.String).alias("language"),
                             pl.lit(None, pl.Float64).alias("language_score"))
    df = df.with_columns(
        pl.lit(shard).alias("shard"),
        pl.lit(run_id).alias("run_id"),
        pl.col("text").str.to_lowercase().str.replace_all(r"\s+", " ").str.strip_chars().alias("_norm"),
    ).with_columns(
        content_id_expr("hash", "_norm").alias("text_hash"),
        # rejected rows get their id too, so `fineinstructions document ID` can say why they are gone;
        # source_row tells apart the same row twice in a file (or a repeated source id): they become an
        # exact duplicate in dedup instead of one id twice
        content_id_expr("doc", "shard", "source_file", "source_row", "source_id", "url", "text").alias("doc_id"),
    ).drop("_norm")
    kept = df.filter(pl.col("reason").is_null()).select(DOCUMENT_COLUMNS)
    rejected = df.filter(pl.col("reason").is_not_null())
    stats.drop_counts(rejected["reason"])
    stats.kept = kept.height
    stats.extra["boilerplate_lines_removed_docs"] = int((df["boilerplate_line_fraction"] > 0).sum())
    stats.check_balanced()
    kept, overlapping = remove_overlaps(kept, benchmarks, ["text"], "doc_id", stats)
    return kept, pl.concat([rejected, overlapping], how="diagonal_relaxed"), stats


@dataclass
class PreparedShard:
    """Part files written batch by batch for one shard, and what happened to its rows."""

    kept: list[Path] = field(default_factory=list)
    signatures: list[Path] = field(default_factory=list)
    bands: list[Path] = field(default_factory=list)  # per batch, each sorted by bucket (merged by the caller)
    rejected: list[Path] = field(default_factory=list)
    stats: StageStats = field(default_factory=StageStats)
    seconds: dict[str, float] = field(default_factory=lambda: {"read": 0.0, "filter": 0.0, "signatures": 0.0})
    malformed: pl.DataFrame = field(default_factory=pl.DataFrame)


def prepare_shard(files: list[str], shard: str, cfg: DocumentFilterConfig, minhash: MinhashConfig,
                  scratch: Path, run_id: str = "", batch_rows: int = 20_000,
                  benchmarks: BenchmarkIndex | None = None) -> PreparedShard:
    """Stream a shard's files batch by batch: filter, compute MinHash signatures of the survivors, write
    each batch's kept / signature / rejected rows as part files under `scratch` (memory stays at one
    batch). Bad input lines (malformed JSON, invalid UTF-8, text not a string) are counted by reason and
    returned for quarantine."""
    out = PreparedShard()
    report = ReadReport()
    batches = iter_text_batches(files, batch_rows, report)
    i = 0
    while True:
        t0 = time.perf_counter()
        batch = next(batches, None)
        out.seconds["read"] += time.perf_counter() - t0
        if batch is None:
            break
        t0 = time.perf_counter()
        kept, rejected, stats = filter_documents(batch, shard, cfg, run_id, benchmarks)
        out.seconds["filter"] += time.perf_counter() - t0
        t0 = time.perf_counter()
        sig, bands = shard_signatures(kept["doc_id"], kept["text_hash"], kept["text"].to_list(), minhash)
        out.seconds["signatures"] += time.perf_counter() - t0
        for name, frame, parts in (("kept", kept, out.kept), ("sig", sig, out.signatures),
                                   ("bands", bands, out.bands), ("rejected", rejected.drop("text"), out.rejected)):
            if frame.height:
                path = scratch / f"{name}-{i:06d}.parquet"
                frame.write_parquet(path)
                parts.append(path)
        out.stats.merge(stats)
        i += 1
    out.malformed = malformed_frame(report)
    for reason, n in out.malformed.group_by("reason").len().sort("reason").rows():
        out.stats.count_unread(reason, n)
    # A source id that repeats is kept (its rows differ by source_row) but worth knowing about.
    ids = [pl.scan_parquet(p).select("source_id") for p in [*out.kept, *out.rejected]]
    out.stats.extra["rows_with_repeated_source_id"] = int(pl.concat(ids).select(
        (pl.col("source_id").is_duplicated() & pl.col("source_id").is_not_null()).sum()).collect().item()) if ids else 0
    out.stats.check_balanced()
    return out


def empty_documents() -> pl.DataFrame:
    return pl.DataFrame(schema=DOCUMENT_SCHEMA)


def apply_duplicate_decisions(filtered: pl.DataFrame, decisions: pl.DataFrame,
                              run_id: str = "") -> tuple[pl.DataFrame, pl.DataFrame, StageStats]:
    """Keep the shard's documents that dedup did not remove; removed ones become rejected rows naming the
    document they duplicate (and its shard). `decisions`: this shard's rows of `document_clusters` (documents
    in a duplicate cluster only; a document without a row has no duplicate)."""
    stats = StageStats(total=filtered.height)
    for name, frame in (("filtered_documents", filtered), ("document_clusters", decisions)):
        repeated = frame.filter(pl.col("doc_id").is_duplicated())["doc_id"]
        if repeated.len():  # a join on a repeated id would multiply rows
            raise ValueError(f"{name}: {repeated.n_unique()} doc_ids appear more than once (e.g. {repeated[0]}); "
                             "it was written by an older version: re-materialize filtered_documents and "
                             "document_clusters")
    removals = decisions.filter(~pl.col("kept")).select([c for c in DECISION_SCHEMA if c not in ("shard", "kept")])
    unknown = removals.join(filtered.select("doc_id"), on="doc_id", how="anti")
    if unknown.height:
        raise ValueError(f"{unknown.height} dedup decisions name documents this shard does not have (e.g. "
                         f"{unknown['doc_id'][0]}): document_clusters was decided against another version of "
                         "the shard's filtered_documents; re-materialize duplicate_edges and document_clusters")
    kept = (filtered.join(removals, on="doc_id", how="anti").select(filtered.columns)
            .with_columns(pl.lit(run_id).alias("run_id")))
    removed = filtered.drop("text").join(removals, on="doc_id", how="inner")
    stats.drop_counts(removed["reason"])
    stats.kept = kept.height
    stats.check_balanced()
    return kept, removed, stats
