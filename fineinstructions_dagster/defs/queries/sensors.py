"""`query_source_sensor`: new query files/folders become `query_source` partitions and runs."""

from dagster import AssetSelection, DefaultSensorStatus, SensorEvaluationContext, SensorResult, SkipReason, sensor

from fineinstructions_dagster.defs.inputs import folder_exists, query_sources
from fineinstructions_dagster.defs.observations import QUERY_FILES, changed_observations
from fineinstructions_dagster.defs.partitions import add_new_partitions, query_source_partitions
from fineinstructions_dagster.defs.resources import InputsResource

ASSETS = ["user_queries", "templates"]


@sensor(minimum_interval_seconds=60, default_status=DefaultSensorStatus.RUNNING,
        asset_selection=AssetSelection.assets(*ASSETS))
def query_source_sensor(context: SensorEvaluationContext, inputs: InputsResource) -> SensorResult | SkipReason:
    """One partition per query file, or per subfolder of query files, in the queries folder."""
    if not folder_exists(inputs.queries()):  # local or s3://
        return SkipReason(f"queries folder {inputs.queries()} does not exist")
    found = query_sources(inputs.queries())
    return add_new_partitions(context, found, query_source_partitions, ASSETS,
                              changed_observations(context.instance, QUERY_FILES, found))
