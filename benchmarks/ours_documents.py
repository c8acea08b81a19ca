"""Our documents stage on the benchmark corpus, one phase per call: `filter` (Gopher quality + repetition
rules, as datatrove runs them; no language ID since datatrove's needs a download) or `dedup` (read ->
MinHash signatures -> LSH clusters -> write kept). Prints one JSON line; the caller measures time and memory."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import polars as pl

from fineinstructions_dagster.config import DocumentFilterConfig
from fineinstructions_dagster.lib.formats import iter_text_batches
from fineinstructions_dagster.lib.ids import content_id_expr
from fineinstructions_dagster.stages.dedup import MinhashConfig, cluster_duplicates, signature_frame
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
    """Over the raw corpus, like datatrove's pipeline: signatures, clusters, write kept docs."""
    sigs, n = [], 0
    for batch in iter_text_batches(files, 20_000):
        n += batch.height
        sig = signature_frame(batch["source_id"].to_list(), batch["text"].to_list(), mh)
        norm = batch.select(pl.col("text").str.to_lowercase().str.replace_all(r"\s+", " ").str.strip_chars()
                            .alias("_norm")).select(content_id_expr("hash", "_norm").alias("text_hash"))
        sigs.append(sig.with_columns(pl.lit("bench").alias("shard"), norm["text_hash"]))
    decisions = cluster_duplicates(pl.concat(sigs), mh)
    removed = set(decisions.filter(~pl.col("kept"))["doc_id"].to_list())
    for i, batch in enumerate(iter_text_batches(files, 20_000)):
        batch.filter(~pl.col("source_id").is_in(list(removed))).write_parquet(out / f"dedup-{i:04d}.parquet")
    multi = decisions.filter(pl.col("cluster").is_duplicated())
    clusters = dict(zip(multi["doc_id"].to_list(), multi["cluster"].to_list(), strict=True))
    (out / "removed.json").write_text(json.dumps({"removed": sorted(removed), "clusters": clusters}))
    return {"docs": n, "removed_file": str(out / "removed.json")}


if __name__ == "__main__":
    extra = sys.argv[4:7]
    main(sys.argv[1], sys.argv[2], sys.argv[3], *((int(extra[0]), int(extra[1]), float(extra[2])) if extra else ()))
