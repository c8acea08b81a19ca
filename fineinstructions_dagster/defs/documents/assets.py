"""`filtered_documents` (per shard, streamed), `document_clusters` (exact + near duplicates across every
shard) and `documents` (per shard, deduplicated)."""

import polars as pl
from dagster import (
    AssetCheckResult,
    AssetCheckSpec,
    AssetExecutionContext,
    AutomationCondition,
    MaterializeResult,
    asset,
)

from fineinstructions_dagster.defs.inputs import corpus_shards, log_skipped_inputs, skipped_metadata
from fineinstructions_dagster.defs.metadata import for_each_partition, stage_metadata
from fineinstructions_dagster.defs.partitions import batched_backfill, corpus_shard_partitions
from fineinstructions_dagster.defs.resources import InputsResource, PipelineResource, StorageResource
from fineinstructions_dagster.stages.dedup import cluster_duplicates
from fineinstructions_dagster.stages.documents import apply_duplicate_decisions, empty_documents, prepare_shard

DOC_ID_UNIQUE = "doc_id_unique"
FILTERED_IDS_UNIQUE = "filtered_doc_ids_unique_with_text"
SIGNATURES = "document_signatures"


@asset(partitions_def=corpus_shard_partitions, group_name="documents", kinds={"polars", "parquet"},
       check_specs=[AssetCheckSpec(FILTERED_IDS_UNIQUE, asset="filtered_documents",
                                   description="doc_id unique within the shard; no kept document without text")])
def filtered_documents(context: AssetExecutionContext, storage: StorageResource, inputs: InputsResource,
                       pipeline: PipelineResource) -> MaterializeResult:
    """One corpus shard streamed in batches through boilerplate-line removal, Gopher quality and repetition
    rules, language ID and the domain blocklist; MinHash signatures of the survivors are stored beside them
    for cross-shard dedup. Dropped documents go to quarantine with their reason."""
    cfg = pipeline.config()
    shard = context.partition_key
    found = corpus_shards(inputs.corpus_dir)
    if shard not in found:
        raise FileNotFoundError(f"corpus shard {shard!r}: no input file for it in {inputs.corpus_dir}")
    skipped = log_skipped_inputs(context.log, inputs.corpus_dir)
    store = storage.store()
    with store.scratch(f"filtered_documents-{shard}") as scratch:
        out = prepare_shard(found[shard], shard, cfg.documents, cfg.minhash, scratch, context.run_id,
                            cfg.document_batch_rows)
        store.write_parts("filtered_documents", out.kept, empty_documents(), shard)
        store.write_parts(SIGNATURES, out.signatures, pl.DataFrame(schema={
            "doc_id": pl.String, "band_keys": pl.List(pl.UInt64), "signature": pl.List(pl.UInt32),
            "shard": pl.String, "text_hash": pl.String}), shard)
        rejected = [pl.read_parquet(out.rejected)] if out.rejected else []
        store.write("filtered_documents", pl.concat([*rejected, out.malformed], how="diagonal_relaxed"), shard,
                    quarantine=True)
    kept = pl.scan_parquet(store.path("filtered_documents", shard))
    preview = kept.head(5).collect()  # not the whole shard
    bad = kept.select(pl.col("doc_id").is_duplicated().any() | (pl.col("text").str.len_chars() == 0).any()).collect()
    return MaterializeResult(
        metadata=stage_metadata(out.stats, preview, ["doc_id", "url", "n_words", "language", "text"],
                                minhash=cfg.minhash.version, **skipped_metadata(skipped),
                                **{f"seconds_{k}": round(v, 3) for k, v in out.seconds.items()}),
        check_results=[AssetCheckResult(check_name=FILTERED_IDS_UNIQUE, passed=not bool(bad.item()))])


@asset(automation_condition=AutomationCondition.eager(),
       deps=[filtered_documents], group_name="documents", kinds={"numpy", "scipy"})
def document_clusters(context: AssetExecutionContext, storage: StorageResource,
                      pipeline: PipelineResource) -> MaterializeResult:
    """Exact (same normalised text) and near (MinHash LSH, verified similarity) duplicate clusters over
    every shard. Each cluster keeps its smallest doc_id, so decisions do not depend on the order shards
    ran in; every other member records the doc_id it duplicates."""
    cfg = pipeline.config()
    store = storage.store()
    current = set(context.instance.get_dynamic_partitions(corpus_shard_partitions.name))
    shards = [p for p in store.partitions(SIGNATURES) if p in current]
    if not shards:
        raise ValueError("no materialized filtered_documents partition: materialize filtered_documents first")
    signatures = pl.concat([store.read(SIGNATURES, s) for s in shards], how="vertical_relaxed")
    decisions = cluster_duplicates(signatures, cfg.minhash)
    store.write("document_clusters", decisions)
    by_reason = decisions.group_by("shard", "reason").len().sort("shard", "reason")
    dup_clusters = decisions.filter(~pl.col("kept"))["cluster"].n_unique()
    return MaterializeResult(metadata={
        "dagster/row_count": decisions.height, "shards": ", ".join(shards), "duplicate_clusters": dup_clusters,
        "exact_duplicates": int((decisions["reason"] == "exact_duplicate").sum()),
        "near_duplicates": int((decisions["reason"] == "near_duplicate").sum()),
        "minhash": cfg.minhash.version, "by_shard": {f"{s}/{r or 'kept'}": int(n) for s, r, n in by_reason.rows()},
    })


@asset(partitions_def=corpus_shard_partitions, backfill_policy=batched_backfill,
       deps=[filtered_documents, document_clusters],
       group_name="documents", kinds={"polars", "parquet"},
       check_specs=[AssetCheckSpec(DOC_ID_UNIQUE, asset="documents")])
def documents(context: AssetExecutionContext, storage: StorageResource) -> MaterializeResult:
    """The shard's filtered documents minus exact and near duplicates found across all shards; removed
    ones are in quarantine with the doc_id they duplicate and the estimated similarity."""
    store = storage.store()

    def one(shard: str) -> MaterializeResult:
        kept, removed, stats = apply_duplicate_decisions(store.read("filtered_documents", shard),
                                                         store.read("document_clusters"), context.run_id)
        store.write("documents", kept.sort("doc_id"), shard)  # sorted: later stages read a chunk's ids by range
        store.write("documents", removed, shard, quarantine=True)
        return MaterializeResult(
            metadata=stage_metadata(stats, kept, ["doc_id", "url", "n_words", "text"],
                                    duplicate_clusters=removed["cluster"].n_unique()),
            check_results=[AssetCheckResult(check_name=DOC_ID_UNIQUE, passed=bool(kept["doc_id"].is_unique().all()))],
        )

    return for_each_partition(context, one)
