"""`documents`: one partition per corpus shard."""

import polars as pl
from dagster import AssetCheckResult, AssetCheckSpec, AssetExecutionContext, MaterializeResult, asset

from fineinstructions_dagster.defs.inputs import corpus_shards, count_malformed, read_partition_input
from fineinstructions_dagster.defs.metadata import stage_metadata
from fineinstructions_dagster.defs.partitions import corpus_shard_partitions
from fineinstructions_dagster.defs.resources import InputsResource, PipelineResource, StorageResource
from fineinstructions_dagster.stages.documents import filter_documents

DOC_ID_UNIQUE = "doc_id_unique"


@asset(
    partitions_def=corpus_shard_partitions,
    group_name="documents",
    kinds={"polars", "parquet"},
    check_specs=[AssetCheckSpec(DOC_ID_UNIQUE, asset="documents")],
)
def documents(context: AssetExecutionContext, storage: StorageResource, inputs: InputsResource,
              pipeline: PipelineResource) -> MaterializeResult:
    """Documents of one corpus shard after length and Gopher-style quality filters and exact dedup
    within the shard; every dropped document is kept in quarantine with its reason."""
    shard = context.partition_key
    raw, malformed = read_partition_input(corpus_shards(inputs.corpus_dir), shard, inputs.corpus_dir,
                                          "corpus shard")
    kept, rejected, stats = filter_documents(raw, shard, pipeline.config().documents, context.run_id)
    count_malformed(stats, malformed)
    store = storage.store()
    store.write("documents", kept, shard)
    store.write("documents", pl.concat([rejected.drop("text", strict=False).with_columns(
        pl.lit(shard).alias("shard")), malformed], how="diagonal_relaxed"), shard, quarantine=True)
    return MaterializeResult(
        metadata=stage_metadata(stats, kept, ["doc_id", "url", "n_words", "text"]),
        check_results=[AssetCheckResult(check_name=DOC_ID_UNIQUE, passed=kept["doc_id"].is_unique().all())],
    )
