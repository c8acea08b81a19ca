"""`missing_or_stale_shards`: an hourly schedule that re-materializes every shard whose pairs are missing or
older than something they were built from (a re-filtered shard, a new dedup decision, a rebuilt template
index): one run per such shard. Once every shard's pairs are current, it runs the dbt quality build if the
pairs changed since the last one, then the export of every shard whose export is missing or older. Run keys
name the upstream state, so later ticks do not request the same work again while nothing changed."""

from dagster import (
    AssetKey,
    AssetSelection,
    DagsterEventType,
    DagsterInstance,
    DefaultScheduleStatus,
    RunRequest,
    ScheduleEvaluationContext,
    SkipReason,
    schedule,
)

from fineinstructions_dagster.defs.partitions import corpus_shard_partitions, exports_to_refresh, shards_to_refresh
from fineinstructions_dagster.defs.quality.assets import QUALITY_PAIRS_KEY, QUALITY_SELECTION

# The per-shard chain in dependency order, and the unpartitioned assets it reads.
SHARD_CHAIN = ["documents", "matches", "instantiations", "judgements", "fineinstructions"]
SHARED_INPUTS = {"documents": ["document_clusters"], "matches": ["template_index"]}


@schedule(cron_schedule="0 * * * *",
          target=AssetSelection.assets(*SHARD_CHAIN, "pretraining_export") | QUALITY_SELECTION,
          default_status=DefaultScheduleStatus.STOPPED)
def missing_or_stale_shards(context: ScheduleEvaluationContext) -> list[RunRequest] | SkipReason:
    return refresh_requests(context.instance)


def refresh_requests(instance: DagsterInstance) -> list[RunRequest] | SkipReason:
    """One run request per shard whose chain is missing a step or has a step older than its inputs."""
    shards = instance.get_dynamic_partitions(corpus_shard_partitions.name)
    mat = DagsterEventType.ASSET_MATERIALIZATION
    latest = {a: instance.get_latest_storage_id_by_partition(AssetKey(a), mat)
              for a in ["filtered_documents", *SHARD_CHAIN]}
    shared = {}
    for name in {n for names in SHARED_INPUTS.values() for n in names}:
        records = instance.fetch_materializations(AssetKey(name), limit=1).records
        shared[name] = records[0].storage_id if records else None
    todo = shards_to_refresh(shards, latest, shared, ["filtered_documents", *SHARD_CHAIN], SHARED_INPUTS)
    if todo:
        return [RunRequest(run_key=f"refresh:{shard}:{state}", partition_key=shard,
                           asset_selection=[AssetKey(a) for a in SHARD_CHAIN],
                           tags={"fineinstructions/reason": reason})
                for shard, (reason, state) in sorted(todo.items())]
    pairs = {s: i for s, i in latest["fineinstructions"].items() if s in shards}
    exports = instance.get_latest_storage_id_by_partition(AssetKey("pretraining_export"), mat)
    quality_records = instance.fetch_materializations(QUALITY_PAIRS_KEY, limit=1).records
    quality = quality_records[0].storage_id if quality_records else None
    need_quality, export = exports_to_refresh(shards, pairs, exports, quality)
    if need_quality:
        return [RunRequest(run_key=f"quality:{max(pairs.values())}",
                           asset_selection=list(QUALITY_SELECTION.resolve(_graph())),
                           tags={"fineinstructions/reason": "pairs changed since the last dbt build"})]
    if export:
        return [RunRequest(run_key=f"export:{shard}:{pairs[shard]}:{quality}", partition_key=shard,
                           asset_selection=[AssetKey("pretraining_export")],
                           tags={"fineinstructions/reason": "export missing or older than its pairs"})
                for shard in export]
    return SkipReason(f"all {len(shards)} shards are materialized, checked and exported")


def _graph():
    from fineinstructions_dagster.definitions import defs  # the whole graph, to resolve the dbt selection

    return defs.resolve_asset_graph()
