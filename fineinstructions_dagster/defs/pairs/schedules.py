"""`missing_or_stale_shards`: an hourly schedule that re-materializes every shard whose pairs are missing or
older than something they were built from (a re-filtered shard, a change to its dedup removal list, a rebuilt
template index): one run per such shard; the dedup step itself is `dedup_sensor`'s. Once every shard's pairs
are current, it runs the dbt quality build if the pairs changed since the last one, then the export of every
shard whose export is missing or older. Run keys name the upstream state, so later ticks do not request the
same work again while nothing changed."""

from dagster import (
    AssetKey,
    AssetSelection,
    DagsterEventType,
    DagsterInstance,
    DefaultScheduleStatus,
    RunRequest,
    RunsFilter,
    ScheduleEvaluationContext,
    SkipReason,
    schedule,
)
from dagster._core.storage.dagster_run import IN_PROGRESS_RUN_STATUSES

from fineinstructions_dagster.defs.partitions import (
    corpus_shard_partitions,
    exports_to_refresh,
    shards_to_refresh,
    shared_steps_to_refresh,
)
from fineinstructions_dagster.defs.quality.assets import QUALITY_PAIRS_KEY, QUALITY_SELECTION
from fineinstructions_dagster.defs.steps import SHARD_STEP

# The per-shard chain in dependency order (the shard job's), and the unpartitioned assets it reads.
SHARD_CHAIN = SHARD_STEP
SHARED_INPUTS = {"documents": ["document_clusters"], "matches": ["template_index"]}



@schedule(cron_schedule="0 * * * *",
          target=AssetSelection.assets(*SHARD_CHAIN, "pretraining_export", "template_index")
          | QUALITY_SELECTION,
          default_status=DefaultScheduleStatus.STOPPED)
def missing_or_stale_shards(context: ScheduleEvaluationContext) -> list[RunRequest] | SkipReason:
    return refresh_requests(context.instance)


def refresh_requests(instance: DagsterInstance) -> list[RunRequest] | SkipReason:
    """One run request per shard whose chain is missing a step or has a step older than its inputs."""
    shards = instance.get_dynamic_partitions(corpus_shard_partitions.name)
    mat = DagsterEventType.ASSET_MATERIALIZATION
    latest = {a: instance.get_latest_storage_id_by_partition(AssetKey(a), mat)
              for a in ["filtered_documents", *SHARD_CHAIN]}
    shared = {name: _latest(instance, name) for name in ("document_clusters", "template_index", "template_bank",
                                                         "user_queries")}
    filtered = {s: i for s, i in latest["filtered_documents"].items() if s in shards}
    first = shared_steps_to_refresh(filtered, shared["document_clusters"], shared["template_bank"],
                                    shared["template_index"])
    if first:  # the chain would fail (no dedup decision) or match against an old index: these go first
        if "template_index" in first:
            return [RunRequest(run_key=f"template_index:{shared['template_bank']}",
                               asset_selection=[AssetKey("template_index")],
                               tags={"fineinstructions/reason": "inputs changed"})]
        # duplicate_edges is partitioned by bucket range, which this schedule's job cannot hold: dedup_sensor
        # (dedup_job) runs it
        return SkipReason("waiting for the dedup step (dedup_sensor or dedup_job): a shard was filtered after "
                          "the last dedup decisions")
    busy = _partitions_in_progress(instance)
    todo = shards_to_refresh([s for s in shards if s not in busy], latest, shared,
                             ["filtered_documents", *SHARD_CHAIN], SHARED_INPUTS,
                             {"document_clusters": _decisions_changed(instance, shards)})
    if todo:
        return [RunRequest(run_key=f"refresh:{shard}:{state}", partition_key=shard,
                           asset_selection=[AssetKey(a) for a in SHARD_CHAIN],
                           tags={"fineinstructions/reason": reason})
                for shard, (reason, state) in sorted(todo.items())]
    if busy:
        return SkipReason(f"shards with a run in progress: {', '.join(sorted(busy))}")
    pairs = {s: i for s, i in latest["fineinstructions"].items() if s in shards}
    exports = instance.get_latest_storage_id_by_partition(AssetKey("pretraining_export"), mat)
    quality_records = instance.fetch_materializations(QUALITY_PAIRS_KEY, limit=1).records
    quality = quality_records[0].storage_id if quality_records else None
    others = max((i for i in (shared["template_bank"], shared["user_queries"]) if i is not None), default=None)
    need_quality, export = exports_to_refresh(shards, pairs, exports, quality, others)
    if need_quality:
        return [RunRequest(run_key=f"quality:{max(pairs.values())}:{others}",
                           asset_selection=list(QUALITY_SELECTION.resolve(_graph())),
                           tags={"fineinstructions/reason": "pairs changed since the last dbt build"})]
    if export:
        return [RunRequest(run_key=f"export:{shard}:{pairs[shard]}:{quality}", partition_key=shard,
                           asset_selection=[AssetKey("pretraining_export")],
                           tags={"fineinstructions/reason": "export missing or older than its pairs"})
                for shard in export]
    return SkipReason(f"all {len(shards)} shards are materialized, checked and exported")


def _latest(instance: DagsterInstance, asset: str) -> int | None:
    """Storage id of the asset's latest materialization (any partition)."""
    records = instance.fetch_materializations(AssetKey(asset), limit=1).records
    return records[0].storage_id if records else None


def _decisions_changed(instance: DagsterInstance, shards: list[str]) -> dict[str, int]:
    """shard -> storage id of the latest document_clusters materialization that changed its removal list (its
    `changed_shards` metadata); a materialization without that field counts as changing every shard."""
    out: dict[str, int] = {}
    for record in instance.fetch_materializations(AssetKey("document_clusters"), limit=200).records:  # newest first
        changed = record.asset_materialization.metadata.get("changed_shards") if record.asset_materialization else None
        names = shards if changed is None else [s for s in str(changed.value).split(", ") if s]
        for shard in names:
            out.setdefault(shard, record.storage_id)
        if changed is None or len(out) == len(shards):
            break
    return out


def _partitions_in_progress(instance: DagsterInstance) -> set[str]:
    """Shards with a queued or running run: asking again for them would start a second, concurrent run."""
    runs = instance.get_run_records(RunsFilter(statuses=IN_PROGRESS_RUN_STATUSES), limit=1000)
    return {r.dagster_run.tags["dagster/partition"] for r in runs if "dagster/partition" in r.dagster_run.tags}


def _graph():
    from fineinstructions_dagster.definitions import defs  # the whole graph, to resolve the dbt selection

    return defs.resolve_asset_graph()
