"""`benchmark_sensor`: `benchmark_ngrams` whenever it is missing or was built for other benchmark files."""

from dagster import (
    AssetKey,
    AssetSelection,
    DefaultSensorStatus,
    RunRequest,
    SensorEvaluationContext,
    SensorResult,
    SkipReason,
    sensor,
)

from fineinstructions_dagster.defs.decontamination.assets import (
    BENCHMARK_NGRAMS,
    benchmarks_version,
    stored_benchmarks_version,
)
from fineinstructions_dagster.defs.resources import InputsResource, PipelineResource, StorageResource
from fineinstructions_dagster.defs.settings import DECONTAMINATION_SETTINGS, changed_settings_observations


@sensor(minimum_interval_seconds=30, default_status=DefaultSensorStatus.RUNNING,
        asset_selection=AssetSelection.assets(BENCHMARK_NGRAMS))
def benchmark_sensor(context: SensorEvaluationContext, storage: StorageResource, pipeline: PipelineResource,
                     inputs: InputsResource) -> SensorResult | SkipReason:
    """On a deployment's first tick, and after a benchmark file was added, replaced or removed (or the n-gram
    setting changed): the settings' new version, then one run of `benchmark_ngrams` for it (run key: the version,
    so a failed run is not repeated until the files change again). The input sensors wait for it."""
    version = benchmarks_version(pipeline, inputs)
    if stored_benchmarks_version(storage.store()) == version:
        return SkipReason(f"{BENCHMARK_NGRAMS} is current (benchmarks version {version})")
    resources = {"pipeline": pipeline, "inputs": inputs}
    return SensorResult(
        asset_events=changed_settings_observations(context.instance, resources, (DECONTAMINATION_SETTINGS,)),
        run_requests=[RunRequest(run_key=f"benchmarks:{version}", asset_selection=[AssetKey(BENCHMARK_NGRAMS)])])
