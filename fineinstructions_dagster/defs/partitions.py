"""Partitions definitions, defined once and imported everywhere, and the scan that adds new keys."""


from dagster import (
    AssetKey,
    DynamicPartitionsDefinition,
    RunRequest,
    SensorEvaluationContext,
    SensorResult,
    SkipReason,
)

query_source_partitions = DynamicPartitionsDefinition(name="query_source")
corpus_shard_partitions = DynamicPartitionsDefinition(name="corpus_shard")


def add_new_partitions(context: SensorEvaluationContext, found: dict[str, list[str]],
                       partitions: DynamicPartitionsDefinition,
                       assets: list[str]) -> SensorResult | SkipReason:
    """Add a partition for every input not yet known and request one run for each new key."""
    assert partitions.name is not None
    known = set(context.instance.get_dynamic_partitions(partitions.name))
    new = sorted(k for k in found if k not in known)
    if not new:
        return SkipReason(f"no new {partitions.name} ({len(found)} known)")
    return SensorResult(
        run_requests=[
            RunRequest(run_key=f"{partitions.name}:{k}", partition_key=k,
                       asset_selection=[AssetKey(a) for a in assets])
            for k in new
        ],
        dynamic_partitions_requests=[partitions.build_add_request(new)],
    )
