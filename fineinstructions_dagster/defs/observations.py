"""The input files as Dagster sees them: `query_files` and `corpus_files`, observable per partition, whose data
version is the hash of the partition's files (size and mtime, or ETag on S3). `user_queries` and
`filtered_documents` read them, so a file replaced in place makes exactly its partition (and, once re-run, what
follows from it) stale, in the UI and for automation. The sensors and the scheduled backfill record an observation
only for a partition whose version changed; the UI's "Observe sources" records them all."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from dagster import (
    AssetKey,
    AssetObservation,
    DagsterEventType,
    DagsterInstance,
    DataVersionsByPartition,
    DynamicPartitionsDefinition,
    ObserveResult,
    observable_source_asset,
)
from dagster._core.definitions.data_version import DATA_VERSION_TAG  # the tag Dagster reads a data version from

from fineinstructions_dagster.defs.inputs import corpus_shards, folder_exists, input_data_versions, query_sources
from fineinstructions_dagster.defs.partitions import corpus_shard_partitions, query_source_partitions
from fineinstructions_dagster.defs.resources import InputsResource

QUERY_FILES = "query_files"
CORPUS_FILES = "corpus_files"


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


def changed_observations(instance: DagsterInstance, asset: str, found: dict[str, list[str]]) -> list[AssetObservation]:
    """An observation for each partition whose files' version differs from the one last observed (new ones too)."""
    before = observed_versions(instance, asset)
    return [AssetObservation(asset_key=asset, partition=key, tags={DATA_VERSION_TAG: version},
                             metadata={"files": len(found[key])})
            for key, version in sorted(input_data_versions(found).items()) if before.get(key) != version]


def observe_inputs(instance: DagsterInstance, inputs: InputsResource) -> dict[str, list[str]]:
    """Record, outside any run, the changed input partitions' versions (after adding new partitions): what
    `fineinstructions run` and the scheduled backfill do before asking Dagster what is stale. Returns asset ->
    the partitions observed."""
    out = {}
    for source in INPUT_SOURCES:
        found = source.found(inputs)
        instance.add_dynamic_partitions(source.partitions.name, sorted(found))  # type: ignore[arg-type]
        events = changed_observations(instance, source.asset, found)
        for event in events:
            instance.report_runless_asset_event(event)
        out[source.asset] = [e.partition for e in events]
    return out


def _observe(context, inputs: InputsResource, source: InputSource) -> DataVersionsByPartition:  # noqa: ANN001
    known = set(context.instance.get_dynamic_partitions(source.partitions.name))
    versions = input_data_versions({k: v for k, v in source.found(inputs).items() if k in known})
    return DataVersionsByPartition(versions)


@observable_source_asset(partitions_def=query_source_partitions, group_name="queries",
                         description="The query files of each source (a file or a subfolder); data version: a hash "
                                     "of their paths, sizes and mtimes (ETags on S3).")
def query_files(context, inputs: InputsResource) -> DataVersionsByPartition | ObserveResult:  # noqa: ANN001
    return _observe(context, inputs, INPUT_SOURCES[0])


@observable_source_asset(partitions_def=corpus_shard_partitions, group_name="documents",
                         description="The corpus file of each shard; data version: a hash of its path, size and "
                                     "mtime (ETag on S3).")
def corpus_files(context, inputs: InputsResource) -> DataVersionsByPartition | ObserveResult:  # noqa: ANN001
    return _observe(context, inputs, INPUT_SOURCES[1])
