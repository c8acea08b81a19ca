"""`corpus_shard_sensor`: new shard files become `corpus_shard` partitions and `filtered_documents` runs; what
follows (dedup, the shard's chain, quality, export) is declarative automation (defs/automation.py)."""

from dagster import (
    AssetSelection,
    DefaultSensorStatus,
    SensorEvaluationContext,
    SensorResult,
    SkipReason,
    sensor,
)

from fineinstructions_dagster.defs.documents.assets import FILTER_ASSETS
from fineinstructions_dagster.defs.observations import INPUT_SOURCES, input_sensor_tick
from fineinstructions_dagster.defs.resources import (
    EmbedderResource,
    InputsResource,
    LLMResource,
    PipelineResource,
    RelevanceResource,
    StorageResource,
)

ASSETS = FILTER_ASSETS


@sensor(minimum_interval_seconds=60, default_status=DefaultSensorStatus.RUNNING,
        asset_selection=AssetSelection.assets(*ASSETS))
def corpus_shard_sensor(context: SensorEvaluationContext, inputs: InputsResource, storage: StorageResource,
                        pipeline: PipelineResource,
                        genericizer_llm: LLMResource, instantiator_llm: LLMResource, judge_llm: LLMResource,
                        embedder: EmbedderResource, relevance: RelevanceResource) -> SensorResult | SkipReason:
    """One partition per shard file (Parquet or JSON Lines) in the corpus folder; the files' and the stages'
    settings' versions where they changed (recorded before any run it requests)."""
    # (resources by name: a sensor called directly, as in tests, is given exactly its parameters)
    return input_sensor_tick(context, INPUT_SOURCES[1], inputs, storage, ASSETS, {
        "pipeline": pipeline, "genericizer_llm": genericizer_llm, "instantiator_llm": instantiator_llm,
        "judge_llm": judge_llm, "embedder": embedder, "relevance": relevance})
