"""The input files as Dagster sees them: `query_files` and `corpus_files`, observable per partition, whose data
version is the hash of the partition's files (size and mtime, or ETag on S3). `user_queries` and
`filtered_documents` read them, so a file replaced in place makes exactly its partition (and, once re-run, what
follows from it) stale, in the UI and for automation. The sensors and the scheduled backfill record an observation
only for a partition whose version changed; the UI's "Observe sources" records them all."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from dagster import (
    AssetKey,
    AssetObservation,
    AssetsDefinition,
    AssetSpec,
    DagsterEventType,
    DagsterInstance,
    DynamicPartitionsDefinition,
    SensorEvaluationContext,
    SensorResult,
    SkipReason,
    multi_observable_source_asset,
)
from dagster._core.definitions.data_version import DATA_VERSION_TAG  # the tag Dagster reads a data version from

from fineinstructions_dagster.defs.decontamination.assets import (
    BENCHMARK_NGRAMS,
    benchmarks_version,
    stored_benchmarks_version,
)
from fineinstructions_dagster.defs.inputs import corpus_shards, folder_exists, input_data_versions, query_sources
from fineinstructions_dagster.defs.partitions import (
    add_new_partitions,
    corpus_shard_partitions,
    query_source_partitions,
)
from fineinstructions_dagster.defs.resources import InputsResource, StorageResource
from fineinstructions_dagster.defs.settings import changed_settings_observations

QUERY_FILES = "query_files"
CORPUS_FILES = "corpus_files"
# On an asset whose materializations all carry one data version (document_clusters: what a shard reads of it is
# versioned per shard, by removal_lists; the dbt models: views): a new materialization makes nothing downstream due.
FIXED_DATA_VERSION_TAG = "fineinstructions/fixed_data_version"


@dataclass(frozen=True)
class InputSource:
    """One input folder as partitions: the observable asset, its partitions and how its files are found."""

    asset: str
    partitions: DynamicPartitionsDefinition
    folder: Callable[[InputsResource], str]
    discover: Callable[[str], dict[str, list[str]]]

    def found(self, inputs: InputsResource) -> dict[str, list[str]]:
        """partition -> its files; empty when the folder does not exist (yet)."""
        folder = self.folder(inputs)
        return self.discover(folder) if folder_exists(folder) else {}


INPUT_SOURCES = (
    InputSource(QUERY_FILES, query_source_partitions, InputsResource.queries, query_sources),
    InputSource(CORPUS_FILES, corpus_shard_partitions, InputsResource.corpus, corpus_shards),
)


def observed_versions(instance: DagsterInstance, asset: str) -> dict[str, str]:
    """partition -> the data version its latest observation recorded (one query for every partition)."""
    tags = instance.event_log_storage.get_latest_tags_by_partition(
        AssetKey(asset), DagsterEventType.ASSET_OBSERVATION, [DATA_VERSION_TAG])
    return {p: t[DATA_VERSION_TAG] for p, t in tags.items() if DATA_VERSION_TAG in t}


def _observations(asset: str, found: dict[str, list[str]], skip: dict[str, str]) -> list[AssetObservation]:
    """One observation per partition of `found` whose version is not the one `skip` names for it."""
    return [AssetObservation(asset_key=asset, partition=key, tags={DATA_VERSION_TAG: version},
                             metadata={"files": len(found[key])})
            for key, version in sorted(input_data_versions(found).items()) if skip.get(key) != version]


def changed_observations(instance: DagsterInstance, asset: str, found: dict[str, list[str]]) -> list[AssetObservation]:
    """An observation for each partition whose files' version differs from the one last observed (new ones too)."""
    return _observations(asset, found, observed_versions(instance, asset))


def find_inputs(inputs: InputsResource) -> dict[str, dict[str, list[str]]]:
    """input asset -> partition -> its files, as the sensors find them."""
    return {source.asset: source.found(inputs) for source in INPUT_SOURCES}


def observe_inputs(instance: DagsterInstance, found: dict[str, dict[str, list[str]]]) -> dict[str, list[str]]:
    """Add a partition per input and record, outside any run, the versions of those whose files changed (`found`:
    input asset -> partition -> files, from `find_inputs` or a listing the caller already made): what
    `fineinstructions run` and the scheduled backfill do before asking Dagster what is stale. Returns asset ->
    the partitions observed."""
    out = {}
    for source in INPUT_SOURCES:
        partitions = found[source.asset]
        instance.add_dynamic_partitions(source.partitions.name, sorted(partitions))  # type: ignore[arg-type]
        events = changed_observations(instance, source.asset, partitions)
        for event in events:
            instance.report_runless_asset_event(event)
        out[source.asset] = [e.partition for e in events]
    return out


def input_sensor_tick(context: SensorEvaluationContext, source: InputSource, inputs: InputsResource,
                      storage: StorageResource, assets: list[str],
                      settings: dict[str, Any]) -> SensorResult | SkipReason:
    """One tick of an input folder's sensor: a partition and a first run for each new input, and the observations
    of inputs whose files changed and of stages whose `settings` (resources by name) changed, recorded before any
    run it requests. New inputs wait while `benchmark_ngrams` is not built for the benchmark files in force (its
    sensor is building it): their first step decontaminates against it."""
    folder = source.folder(inputs)
    if not folder_exists(folder):  # local or s3://: waited for, not an error
        return SkipReason(f"{source.asset} folder {folder} does not exist")
    found = source.discover(folder)
    observations = [*changed_observations(context.instance, source.asset, found),
                    *changed_settings_observations(context.instance, {**settings, "inputs": inputs})]
    if stored_benchmarks_version(storage.store()) != benchmarks_version(settings["pipeline"], inputs):
        return SensorResult(asset_events=observations, skip_reason=f"waiting for {BENCHMARK_NGRAMS} to be built for "
                                                                   "the benchmark files in force (benchmark_sensor)")
    return add_new_partitions(context, found, source.partitions, assets, observations)


def _observable(source: InputSource, group: str, description: str) -> AssetsDefinition:
    """The UI's "Observe sources" on one input: every known partition's version, from its files now."""

    @multi_observable_source_asset(
        name=source.asset, can_subset=True,
        specs=[AssetSpec(source.asset, partitions_def=source.partitions, group_name=group, skippable=True,
                         description=description)])
    def observe(context, inputs: InputsResource):  # noqa: ANN001, ANN202 - Dagster reads the annotations
        # yielded as events, so the op has no output of its own (a returned None is an observation without a
        # data version, which would read as a change of every partition)
        known = set(context.instance.get_dynamic_partitions(source.partitions.name))  # type: ignore[arg-type]
        yield from _observations(source.asset, {k: v for k, v in source.found(inputs).items() if k in known}, {})

    return observe


query_files = _observable(INPUT_SOURCES[0], "queries", "The query files of each source (a file or a subfolder); "
                          "data version: a hash of their paths, sizes and mtimes (ETags on S3).")
corpus_files = _observable(INPUT_SOURCES[1], "documents", "The corpus file of each shard; data version: a hash of "
                           "its path, size and mtime (ETag on S3).")
