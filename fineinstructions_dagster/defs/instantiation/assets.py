"""`instantiations`: instruction + grounded answer per match."""

from dagster import AssetCheckResult, AssetCheckSpec, AssetExecutionContext, MaterializeResult, asset

from fineinstructions_dagster.defs.matching.assets import matches
from fineinstructions_dagster.defs.metadata import for_each_partition, require_all_joined, stage_metadata
from fineinstructions_dagster.defs.partitions import batched_backfill, corpus_shard_partitions
from fineinstructions_dagster.defs.resources import LLMResource, PipelineResource, StorageResource
from fineinstructions_dagster.llm.cache import GenerationStats
from fineinstructions_dagster.stages.instantiation import instantiate_matches
from fineinstructions_dagster.stages.llm_calls import LLMCall

GROUNDING_IN_RANGE = "grounding_in_unit_interval"


@asset(partitions_def=corpus_shard_partitions, backfill_policy=batched_backfill, deps=[matches],
       group_name="instantiation",
       kinds={"vllm", "parquet"}, pool="gpu",
       check_specs=[AssetCheckSpec(GROUNDING_IN_RANGE, asset="instantiations")])
def instantiations(context: AssetExecutionContext, storage: StorageResource, instantiator_llm: LLMResource,
                   pipeline: PipelineResource) -> MaterializeResult:
    """Each matched template filled from its document, with an answer drawn from the document and
    the share of the answer copied from it (grounding). Unusable outputs go to quarantine."""
    cfg = pipeline.config()
    store = storage.store()

    def one(shard: str) -> MaterializeResult:
        found = store.read("matches", shard).select("match_id", "doc_id", "template_id", "shard")
        pending = require_all_joined(
            found,
            found.join(store.read("documents", shard).select("doc_id", "text"), on="doc_id", how="inner")
            .join(store.read("template_bank").select("template_id", "template"), on="template_id", how="inner"),
            f"matches[{shard}] -> documents/template_bank",
        )
        with storage.generation_cache() as cache:
            llm = LLMCall(instantiator_llm.engine(), cache, GenerationStats())
            kept, quarantined, stats = instantiate_matches(
                pending, llm, cfg.instantiator_sampling, cfg.max_document_chars, cfg.max_instruction_chars,
                cfg.max_answer_chars, context.run_id, cfg.instantiator_format)
        store.write("instantiations", kept, shard)
        store.write("instantiations", quarantined, shard, quarantine=True)
        ok = kept.height == 0 or bool(kept["grounding"].is_between(0, 1).all())
        return MaterializeResult(
            metadata=stage_metadata(stats, kept, ["instruction", "answer", "grounding"],
                                    mean_grounding=float(kept["grounding"].mean()) if kept.height else 0.0),
            check_results=[AssetCheckResult(check_name=GROUNDING_IN_RANGE, passed=ok)],
        )

    return for_each_partition(context, one)
