"""`corpus_shard_sensor`: new shard files become `corpus_shard` partitions and `filtered_documents` runs;
`dedup_sensor`: the cross-shard dedup step after a shard was (re-)filtered."""

from dagster import (
    AssetKey,
    AssetSelection,
    DagsterEventType,
    DagsterInstance,
    DefaultSensorStatus,
    RunRequest,
    SensorEvaluationContext,
    SensorResult,
    SkipReason,
    sensor,
)

from fineinstructions_dagster.defs.documents.assets import FILTER_ASSETS
from fineinstructions_dagster.defs.inputs import corpus_shards, folder_exists
from fineinstructions_dagster.defs.partitions import EVERY_BUCKET_RANGE, add_new_partitions, corpus_shard_partitions
from fineinstructions_dagster.defs.resources import InputsResource

ASSETS = FILTER_ASSETS


@sensor(minimum_interval_seconds=60, default_status=DefaultSensorStatus.RUNNING,
        asset_selection=AssetSelection.assets(*ASSETS))
def corpus_shard_sensor(context: SensorEvaluationContext, inputs: InputsResource) -> SensorResult | SkipReason:
    """One partition per shard file (Parquet or JSON Lines) in the corpus folder."""
    if not folder_exists(inputs.corpus_dir):  # local or s3://
        return SkipReason(f"corpus folder {inputs.corpus_dir} does not exist")
    return add_new_partitions(context, corpus_shards(inputs.corpus_dir), corpus_shard_partitions, ASSETS)


def dedup_request(instance: DagsterInstance) -> RunRequest | SkipReason:
    """A run of every bucket range and the components when a shard was filtered after the last dedup."""
    shards = set(instance.get_dynamic_partitions(corpus_shard_partitions.name))
    filtered = {s: i for s, i in instance.get_latest_storage_id_by_partition(
        AssetKey("filtered_documents"), DagsterEventType.ASSET_MATERIALIZATION).items() if s in shards}
    records = instance.fetch_materializations(AssetKey("document_clusters"), limit=1).records
    clusters = records[0].storage_id if records else None
    if not filtered:
        return SkipReason("no filtered shard yet")
    newest = max(filtered.values())
    if clusters is not None and clusters > newest:
        return SkipReason(f"dedup decisions are newer than every filtered shard ({len(filtered)})")
    return RunRequest(run_key=f"dedup:{newest}", tags={**EVERY_BUCKET_RANGE,
                                                       "fineinstructions/reason": "a shard was (re-)filtered"})


@sensor(minimum_interval_seconds=60, default_status=DefaultSensorStatus.STOPPED, job_name="dedup_job")
def dedup_sensor(context: SensorEvaluationContext) -> RunRequest | SkipReason:
    """Dedup across shards once a shard was filtered after the last decisions: every bucket range of
    `duplicate_edges` in one run, then `document_clusters` (stopped by default, like the schedule it feeds:
    `missing_or_stale_shards` runs a shard's chain once its decisions are there)."""
    return dedup_request(context.instance)
