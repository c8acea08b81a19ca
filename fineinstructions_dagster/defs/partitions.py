"""Partitions definitions, defined once and imported everywhere, and the sensors' step that adds new keys."""

from dagster import (
    AssetKey,
    AssetObservation,
    BackfillPolicy,
    DynamicPartitionsDefinition,
    RunRequest,
    SensorEvaluationContext,
    SensorResult,
    SkipReason,
    StaticPartitionsDefinition,
)

from fineinstructions_dagster.stages.dedup import bucket_range_keys

query_source_partitions = DynamicPartitionsDefinition(name="query_source")
corpus_shard_partitions = DynamicPartitionsDefinition(name="corpus_shard")
# Ranges of LSH buckets: the dedup step's unit of work, fixed whatever the number of shards.
bucket_range_partitions = StaticPartitionsDefinition(bucket_range_keys())
# Dagster's partition-range tags for one run over every bucket range (as a single-run backfill launches it).
EVERY_BUCKET_RANGE = {"dagster/asset_partition_range_start": bucket_range_keys()[0],
                      "dagster/asset_partition_range_end": bucket_range_keys()[-1]}

# A backfill runs up to this many partitions of an asset in one run, so the LLM (and embedder) loads once
# per run rather than once per partition; set on every asset partitioned by shard or source.
PARTITIONS_PER_RUN = 8
batched_backfill = BackfillPolicy.multi_run(max_partitions_per_run=PARTITIONS_PER_RUN)


def add_new_partitions(context: SensorEvaluationContext, found: dict[str, list[str]],
                       partitions: DynamicPartitionsDefinition, assets: list[str],
                       observations: list[AssetObservation]) -> SensorResult | SkipReason:
    """Add a partition for every input not yet known and request one run for each new key; record the
    `observations` (the inputs whose files changed: a replaced file makes its partition stale, and what re-runs
    it is the automation or the scheduled backfill, not this sensor)."""
    assert partitions.name is not None
    known = set(context.instance.get_dynamic_partitions(partitions.name))
    new = sorted(k for k in found if k not in known)
    if not new and not observations:
        return SkipReason(f"no new or changed {partitions.name} ({len(found)} known)")
    return SensorResult(
        asset_events=observations,
        run_requests=[
            RunRequest(run_key=f"{partitions.name}:{k}", partition_key=k,
                       asset_selection=[AssetKey(a) for a in assets])
            for k in new
        ],
        dynamic_partitions_requests=[partitions.build_add_request(new)],
    )
