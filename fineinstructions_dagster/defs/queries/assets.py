"""`user_queries`: one partition per query source."""

import polars as pl
from dagster import AssetCheckResult, AssetCheckSpec, AssetExecutionContext, MaterializeResult, asset

from fineinstructions_dagster.defs.automation import input_files_replaced
from fineinstructions_dagster.defs.decontamination.assets import BENCHMARK_NGRAMS, load_index
from fineinstructions_dagster.defs.inputs import (
    log_skipped_inputs,
    query_sources,
    read_partition_input,
    skipped_metadata,
)
from fineinstructions_dagster.defs.metadata import for_each_partition, stage_metadata
from fineinstructions_dagster.defs.observations import QUERY_FILES
from fineinstructions_dagster.defs.partitions import batched_backfill, query_source_partitions
from fineinstructions_dagster.defs.resources import InputsResource, PipelineResource, StorageResource
from fineinstructions_dagster.defs.settings import QUERY_SETTINGS
from fineinstructions_dagster.lib.versions import code_version
from fineinstructions_dagster.stages import queries as queries_stage
from fineinstructions_dagster.stages.queries import clean_queries

CODE_VERSION = code_version(queries_stage)

QUERY_ID_UNIQUE = "query_id_unique"


@asset(
    partitions_def=query_source_partitions,
    backfill_policy=batched_backfill,
    group_name="queries",
    code_version=CODE_VERSION,
    deps=[QUERY_FILES, QUERY_SETTINGS.key, BENCHMARK_NGRAMS],
    automation_condition=input_files_replaced(),
    kinds={"polars", "parquet"},
    check_specs=[AssetCheckSpec(QUERY_ID_UNIQUE, asset="user_queries")],
)
def user_queries(context: AssetExecutionContext, storage: StorageResource, inputs: InputsResource,
                 pipeline: PipelineResource) -> MaterializeResult:
    """Real user queries from one source: whitespace-normalised, filtered by length and a blocklist,
    exact-deduplicated, and none that shares an n-gram with a benchmark item. Dropped rows go to quarantine with
    their reason."""

    skipped = log_skipped_inputs(context.log, inputs.queries())
    store = storage.store()
    benchmarks, index_metadata = load_index(store, pipeline, inputs)

    def one(source: str) -> MaterializeResult:
        raw, malformed = read_partition_input(query_sources(inputs.queries()), source, inputs.queries(),
                                              "query source")
        kept, rejected, stats = clean_queries(raw, source, pipeline.config().queries, context.run_id, benchmarks)
        for reason, n in malformed.group_by("reason").len().rows():  # bad lines, counted by what was wrong
            stats.count_unread(reason, n)
        store.write("user_queries", kept, source)
        store.write("user_queries", pl.concat([rejected, malformed], how="diagonal_relaxed"), source, quarantine=True)
        return MaterializeResult(
            metadata=stage_metadata(stats, kept, ["query_id", "text"], **skipped_metadata(skipped), **index_metadata),
            check_results=[AssetCheckResult(check_name=QUERY_ID_UNIQUE, passed=kept["query_id"].is_unique().all())],
        )

    return for_each_partition(context, one)
