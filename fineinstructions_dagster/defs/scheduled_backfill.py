"""`scheduled_backfill`: at each tick of a cron (FINEINSTRUCTIONS_BACKFILL_CRON, nightly by default, in
FINEINSTRUCTIONS_BACKFILL_TIMEZONE), one Dagster backfill of whatever is new or stale, as Dagster's own staleness
says: the inputs and each stage's settings are observed first (new partitions added, replaced files and changed
settings given new data versions), then every missing or stale asset partition and what follows from it is
backfilled, the backfill policies batching the shards. Stopped by default, like the automation sensor: start it
in the UI (Automation) or with `dagster sensor start scheduled_backfill`.

Why a sensor on a cron and not a `ScheduleDefinition`: Dagster 1.13's scheduler launches runs only, while a
sensor's request of an asset-graph subset is submitted as a backfill (what the automation sensor emits too)."""

from __future__ import annotations

from collections import Counter

from dagster import (
    AssetSelection,
    DefaultSensorStatus,
    RunRequest,
    SensorEvaluationContext,
    SensorResult,
    sensor,
)
from dagster._core.definitions.assets.graph.asset_graph_subset import AssetGraphSubset
from dagster._core.definitions.events import AssetKeyPartitionKey
from dagster._core.execution.backfill import BulkActionsFilter, BulkActionStatus
from dagster._time import get_current_datetime
from dagster._utils.schedules import reverse_cron_string_iterator

from fineinstructions_dagster.defs.observations import find_inputs, observe_inputs
from fineinstructions_dagster.defs.resources import (
    EmbedderResource,
    InputsResource,
    LLMResource,
    PipelineResource,
    RelevanceResource,
    env_value,
)
from fineinstructions_dagster.defs.settings import observe_settings
from fineinstructions_dagster.defs.staleness import due_asset_partitions

SCHEDULED_TAG = "fineinstructions/scheduled_backfill"


def describe(due: set[AssetKeyPartitionKey]) -> str:
    """'asset (n partitions), ...' for the tick's log."""
    counts = Counter(ap.asset_key.to_user_string() for ap in due)
    return ", ".join(f"{k} ({n})" for k, n in sorted(counts.items()))


# Its selection is every materializable asset: the daemon refuses a sensor's backfill of assets outside it.
@sensor(minimum_interval_seconds=30, default_status=DefaultSensorStatus.STOPPED, asset_selection=AssetSelection.all(),
        description="At each tick of FINEINSTRUCTIONS_BACKFILL_CRON (nightly by default): observe the inputs, then "
                    "one backfill of every new or stale asset partition and what follows from it.")
def scheduled_backfill(context: SensorEvaluationContext, inputs: InputsResource, pipeline: PipelineResource,
                       genericizer_llm: LLMResource, instantiator_llm: LLMResource, judge_llm: LLMResource,
                       embedder: EmbedderResource, relevance: RelevanceResource) -> SensorResult:
    cron, timezone = env_value("FINEINSTRUCTIONS_BACKFILL_CRON"), env_value("FINEINSTRUCTIONS_BACKFILL_TIMEZONE")
    tick = next(reverse_cron_string_iterator(get_current_datetime().timestamp(), cron, timezone))
    cursor = str(tick.timestamp())
    if context.cursor is None:  # as a schedule does, a tick before the sensor was started is not caught up
        return SensorResult(skip_reason=f"started: the first backfill at the tick after {tick} ({cron}, {timezone})",
                            cursor=cursor)
    if float(context.cursor) >= tick.timestamp():
        return SensorResult(skip_reason=f"tick {tick} handled; next per {cron!r} ({timezone})", cursor=context.cursor)
    running = context.instance.get_backfills(filters=BulkActionsFilter(
        statuses=[BulkActionStatus.REQUESTED], tags={SCHEDULED_TAG: "true"}), limit=1)
    if running:
        return SensorResult(skip_reason=f"tick {tick}: backfill {running[0].backfill_id} is still running",
                            cursor=cursor)
    observed = observe_inputs(context.instance, find_inputs(inputs))
    for asset, partitions in observed.items():
        if partitions:
            context.log.info(f"{asset}: new or changed {', '.join(partitions)}")
    settings = {"pipeline": pipeline, "genericizer_llm": genericizer_llm, "instantiator_llm": instantiator_llm,
                "judge_llm": judge_llm, "embedder": embedder, "relevance": relevance, "inputs": inputs}
    for key in observe_settings(context.instance, settings):
        context.log.info(f"{key}: changed")
    graph = context.repository_def.asset_graph
    due = due_asset_partitions(context.instance, graph)
    if not due:
        return SensorResult(skip_reason=f"tick {tick}: nothing new or stale", cursor=cursor)
    context.log.info(f"tick {tick}: backfilling {describe(due)}")
    subset = AssetGraphSubset.from_asset_partition_set(due, graph)
    return SensorResult(run_requests=[RunRequest.for_asset_graph_subset(
        subset, tags={SCHEDULED_TAG: "true", "fineinstructions/cron_tick": tick.isoformat()})], cursor=cursor)
