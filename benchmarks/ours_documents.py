"""Our documents stage on the benchmark corpus, one phase per call: `filter` (Gopher quality + repetition
rules, as datatrove runs them; no language ID since datatrove's needs a download) or `dedup` (read -> MinHash
signatures and band rows -> every bucket range -> components -> write kept). Prints one JSON line; the caller
measures time and memory."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import polars as pl

from fineinstructions_dagster.config import DocumentFilterConfig
from fineinstructions_dagster.lib.formats import iter_text_batches
from fineinstructions_dagster.lib.ids import content_id_expr
from fineinstructions_dagster.stages.dedup import MinhashConfig, dedup_in_one_process, shard_signatures
from fineinstructions_dagster.stages.documents import filter_documents


def main(phase: str, corpus: str, work: str, *lsh: float) -> None:
    """`lsh`: optional bands, rows, min_similarity; the pipeline's defaults otherwise."""
    out = Path(work)
    out.mkdir(parents=True, exist_ok=True)
    files = sorted(str(p) for p in Path(corpus).glob("corpus-*.jsonl"))
    if phase == "filter":
        print(json.dumps(filter_phase(files, out)))
    else:
        overrides = dict(zip(("bands", "rows", "min_similarity"), lsh, strict=False))
        print(json.dumps(dedup_phase(files, out, MinhashConfig(**overrides))))  # type: ignore[arg-type]


def filter_phase(files: list[str], out: Path) -> dict:
    cfg = DocumentFilterConfig(languages=None)
    n, kept_n = 0, 0
    for i, batch in enumerate(iter_text_batches(files, 20_000)):
        kept, _, stats = filter_documents(batch, "bench", cfg)
        kept.write_parquet(out / f"filtered-{i:04d}.parquet")
        n += batch.height
        kept_n += kept.height
    return {"docs": n, "kept": kept_n}


def dedup_phase(files: list[str], out: Path, mh: MinhashConfig) -> dict:
    """Over the raw corpus, like datatrove's pipeline, through the pipeline's three dedup steps: signatures and
    band rows per batch, every bucket range, the components; then write the kept documents."""
    n, sig_parts, band_parts, ids = 0, [], [], []
    for i, batch in enumerate(iter_text_batches(files, 20_000)):
        n += batch.height
        b = batch.with_columns(
            content_id_expr("doc", "source_id").alias("doc_id"),
            pl.col("text").str.to_lowercase().str.replace_all(r"\s+", " ").str.strip_chars().alias("_norm"),
        ).with_columns(content_id_expr("hash", "_norm").alias("text_hash"))
        sig, bands = shard_signatures(b["doc_id"], b["text_hash"], b["text"].to_list(), mh)
        sig_parts.append(out / f"sig-{i:04d}.parquet")
        band_parts.append(out / f"bands-{i:04d}.parquet")
        sig.write_parquet(sig_parts[-1])
        bands.write_parquet(band_parts[-1])
        ids.append(b.select("doc_id", "source_id"))
    decisions = dedup_in_one_process({"bench": (sig_parts, band_parts)}, out, mh)
    named = decisions.join(pl.concat(ids), on="doc_id", how="left")
    removed = set(named.filter(~pl.col("kept"))["source_id"].to_list())
    for i, batch in enumerate(iter_text_batches(files, 20_000)):
        batch.filter(~pl.col("source_id").is_in(list(removed))).write_parquet(out / f"dedup-{i:04d}.parquet")
    # every row of `decisions` is in a cluster of two or more (documents without a duplicate have no row)
    clusters = dict(zip(named["source_id"].to_list(), named["cluster"].to_list(), strict=True))
    (out / "removed.json").write_text(json.dumps({"removed": sorted(removed), "clusters": clusters}))
    return {"docs": n, "removed_file": str(out / "removed.json")}


if __name__ == "__main__":
    extra = sys.argv[4:7]
    main(sys.argv[1], sys.argv[2], sys.argv[3], *((int(extra[0]), int(extra[1]), float(extra[2])) if extra else ()))
