"""What is due, as Dagster's own staleness says (code versions, data versions of the inputs and settings, the
materializations' provenance): one resolver for the scheduled backfill and `fineinstructions run`, the same the
UI's stale badges come from."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager

from dagster import AssetKey, partition_loading_context
from dagster._core.asset_graph_view.asset_graph_view import AssetGraphView, TemporalContext
from dagster._core.definitions.assets.graph.base_asset_graph import BaseAssetGraph
from dagster._core.definitions.data_version import CachingStaleStatusResolver, StaleCause, StaleStatus
from dagster._core.definitions.events import AssetKeyPartitionKey
from dagster._core.instance import DagsterInstance
from dagster._time import get_current_datetime

from fineinstructions_dagster.defs.observations import FIXED_DATA_VERSION_TAG

DUE = (StaleStatus.MISSING, StaleStatus.STALE)


@contextmanager
def stale_resolver(instance: DagsterInstance, graph: BaseAssetGraph) -> Iterator[CachingStaleStatusResolver]:
    """Dagster's stale-status resolver over the instance as it is now (it caches: make one per question)."""
    now = get_current_datetime()
    with partition_loading_context(now, instance):
        view = AssetGraphView(temporal_context=TemporalContext(effective_dt=now, last_event_id=None),
                              instance=instance, asset_graph=graph)
        yield CachingStaleStatusResolver(instance, graph, view)


def partitions_of(graph: BaseAssetGraph, key: AssetKey) -> list[str | None]:
    node = graph.get(key)
    return list(node.partitions_def.get_partition_keys()) if node.partitions_def else [None]


def stale_reasons(instance: DagsterInstance, graph: BaseAssetGraph,
                  wanted: Iterable[AssetKeyPartitionKey]) -> dict[AssetKeyPartitionKey, str]:
    """For each of `wanted` that is missing or stale, why (Dagster's first stale cause, or 'missing')."""
    out = {}
    with stale_resolver(instance, graph) as resolver:
        for ap in wanted:
            status = resolver.get_status(ap.asset_key, ap.partition_key)
            if status == StaleStatus.MISSING:
                out[ap] = "missing"
            elif status == StaleStatus.STALE:
                causes = resolver.get_stale_causes(ap.asset_key, ap.partition_key)
                out[ap] = _cause(causes[0]) if causes else "stale"
    return out


def _cause(cause: StaleCause) -> str:
    dep = cause.dependency
    if dep is None:
        return cause.reason
    return f"{cause.reason} ({dep.asset_key.to_user_string()}{f' [{dep.partition_key}]' if dep.partition_key else ''})"


def due_asset_partitions(instance: DagsterInstance, graph: BaseAssetGraph) -> set[AssetKeyPartitionKey]:
    """Every asset partition Dagster calls missing or stale, and every partition downstream of one (Dagster
    marks a child stale only once its parent has a new data version, so what follows a stale step is due with
    it), except across a fixed data version. Read after the inputs and settings were observed."""
    with stale_resolver(instance, graph) as resolver:
        due = {AssetKeyPartitionKey(key, partition) for key in sorted(graph.materializable_asset_keys)
               for partition in partitions_of(graph, key) if resolver.get_status(key, partition) in DUE}
        queue = list(due)
        while queue:
            parent = queue.pop()
            if FIXED_DATA_VERSION_TAG in graph.get(parent.asset_key).tags:
                continue
            for child in graph.get_children_partitions(parent.asset_key, parent.partition_key):
                if child not in due:
                    due.add(child)
                    queue.append(child)
    return {ap for ap in due if graph.get(ap.asset_key).is_materializable}


