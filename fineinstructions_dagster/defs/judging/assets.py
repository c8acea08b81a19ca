"""`judgements`: the LLM judge's Likert score and feedback per instantiation."""

from dagster import AssetCheckResult, AssetCheckSpec, AssetExecutionContext, MaterializeResult, asset

from fineinstructions_dagster.defs.instantiation.assets import instantiations
from fineinstructions_dagster.defs.metadata import for_each_partition, require_all_joined, stage_metadata
from fineinstructions_dagster.defs.partitions import batched_backfill, corpus_shard_partitions
from fineinstructions_dagster.defs.resources import LLMResource, PipelineResource, StorageResource
from fineinstructions_dagster.llm.cache import GenerationStats
from fineinstructions_dagster.stages.judging import judge_instantiations
from fineinstructions_dagster.stages.llm_calls import LLMCall

SCORES_ON_SCALE = "judge_scores_on_likert_scale"


@asset(partitions_def=corpus_shard_partitions, backfill_policy=batched_backfill, deps=[instantiations],
       group_name="judging",
       kinds={"vllm", "parquet"}, pool="gpu",
       check_specs=[AssetCheckSpec(SCORES_ON_SCALE, asset="judgements",
                                   description="every kept judgement has an integer score in 1..5 and feedback")])
def judgements(context: AssetExecutionContext, storage: StorageResource, judge_llm: LLMResource,
               pipeline: PipelineResource) -> MaterializeResult:
    """A 1-5 Likert score with feedback for each instantiated pair, judged against its document."""
    cfg = pipeline.config()
    store = storage.store()

    def one(shard: str) -> MaterializeResult:
        found = store.read("instantiations", shard).select("instantiation_id", "doc_id", "shard", "instruction",
                                                           "answer")
        pending = require_all_joined(
            found, found.join(store.read("documents", shard).select("doc_id", "text"), on="doc_id", how="inner"),
            f"instantiations[{shard}] -> documents")
        with storage.generation_cache() as cache:
            llm = LLMCall(judge_llm.engine(), cache, GenerationStats())
            kept, quarantined, stats = judge_instantiations(pending, llm, cfg.judge_sampling, cfg.max_document_chars,
                                                            cfg.max_feedback_chars, context.run_id, cfg.judge_format)
        store.write("judgements", kept, shard)
        store.write("judgements", quarantined, shard, quarantine=True)
        hist = {int(s): int(n) for s, n in kept.group_by("score").len().sort("score").iter_rows()}
        ok = kept.height == 0 or bool(kept["score"].is_between(1, 5).all() and kept["feedback"].is_not_null().all())
        return MaterializeResult(
            metadata=stage_metadata(stats, kept, ["judgement_id", "score", "feedback"], score_histogram=hist,
                                    judge_format=cfg.judge_format),
            check_results=[AssetCheckResult(check_name=SCORES_ON_SCALE, passed=ok, metadata={"histogram": hist})])

    return for_each_partition(context, one)
