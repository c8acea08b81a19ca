"""`query_source_sensor`: new query files/folders become `query_source` partitions and runs."""

from dagster import AssetSelection, DefaultSensorStatus, SensorEvaluationContext, SensorResult, SkipReason, sensor

from fineinstructions_dagster.defs.inputs import folder_exists, query_sources
from fineinstructions_dagster.defs.observations import QUERY_FILES, changed_observations
from fineinstructions_dagster.defs.partitions import add_new_partitions, query_source_partitions
from fineinstructions_dagster.defs.resources import (
    EmbedderResource,
    InputsResource,
    LLMResource,
    PipelineResource,
    RelevanceResource,
)
from fineinstructions_dagster.defs.settings import changed_settings_observations

ASSETS = ["user_queries", "templates"]


@sensor(minimum_interval_seconds=60, default_status=DefaultSensorStatus.RUNNING,
        asset_selection=AssetSelection.assets(*ASSETS))
def query_source_sensor(context: SensorEvaluationContext, inputs: InputsResource, pipeline: PipelineResource,
                        genericizer_llm: LLMResource, instantiator_llm: LLMResource, judge_llm: LLMResource,
                        embedder: EmbedderResource, relevance: RelevanceResource) -> SensorResult | SkipReason:
    """One partition per query file, or per subfolder of query files, in the queries folder; the files' and the
    stages' settings' versions where they changed (recorded before any run it requests)."""
    # (resources by name: a sensor called directly, as in tests, is given exactly its parameters)
    settings = {"pipeline": pipeline, "genericizer_llm": genericizer_llm, "instantiator_llm": instantiator_llm,
                "judge_llm": judge_llm, "embedder": embedder, "relevance": relevance}
    if not folder_exists(inputs.queries()):  # local or s3://
        return SkipReason(f"queries folder {inputs.queries()} does not exist")
    found = query_sources(inputs.queries())
    return add_new_partitions(context, found, query_source_partitions, ASSETS,
                              [*changed_observations(context.instance, QUERY_FILES, found),
                               *changed_settings_observations(context.instance, settings)])
