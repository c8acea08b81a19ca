"""`judgements`: the LLM judge's Likert score and feedback per instantiation, chunk by chunk."""

import polars as pl
from dagster import AssetCheckResult, AssetCheckSpec, AssetExecutionContext, MaterializeResult, asset

from fineinstructions_dagster.defs.automation import shard_step
from fineinstructions_dagster.defs.instantiation.assets import instantiations
from fineinstructions_dagster.defs.metadata import (
    for_each_partition,
    progress_reporter,
    require_all_joined,
    stage_metadata,
    throughput_metadata,
)
from fineinstructions_dagster.defs.partitions import batched_backfill, corpus_shard_partitions
from fineinstructions_dagster.defs.resources import LLMResource, PipelineResource, StorageResource
from fineinstructions_dagster.lib.chunks import (
    ChunkOutput,
    chunks_of,
    count_rows,
    definition_hash,
    rows_for,
    run_chunked,
)
from fineinstructions_dagster.llm.cache import GenerationStats
from fineinstructions_dagster.prompts import judge
from fineinstructions_dagster.stages.judging import BASE_SCHEMA, JUDGEMENT_SCHEMA, judge_instantiations
from fineinstructions_dagster.stages.llm_calls import QUARANTINE_EXTRA, LLMCall

SCORES_ON_SCALE = "judge_scores_on_likert_scale"


@asset(partitions_def=corpus_shard_partitions, backfill_policy=batched_backfill, deps=[instantiations, "documents"],
       automation_condition=shard_step(),
       group_name="judging",
       kinds={"vllm", "parquet"}, pool="gpu",
       check_specs=[AssetCheckSpec(SCORES_ON_SCALE, asset="judgements",
                                   description="every kept judgement has an integer score in 1..5 and feedback")])
def judgements(context: AssetExecutionContext, storage: StorageResource, judge_llm: LLMResource,
               pipeline: PipelineResource) -> MaterializeResult:
    """A 1-5 Likert score with feedback for each instantiated pair, judged against its document; the shard's
    instantiations are read `chunk_rows` at a time and each chunk kept as a part, so a killed run resumes."""
    cfg = pipeline.config()
    store = storage.store()
    engine = judge_llm.engine()
    judge_format = cfg.format_for("judge", engine.info.model)
    definition = definition_hash("judgements", engine.info.backend, engine.info.model, engine.info.revision,
                                 judge.PROMPT_VERSION, judge.FLOW_PROMPT_VERSION, cfg.judge_sampling,
                                 judge_format, cfg.max_document_chars, cfg.max_feedback_chars)

    def one(shard: str) -> MaterializeResult:
        source, docs = store.file("instantiations", shard), store.file("documents", shard)

        def process(chunk: pl.DataFrame) -> ChunkOutput:
            pending = require_all_joined(
                chunk, chunk.join(rows_for(docs, "doc_id", chunk["doc_id"], ["doc_id", "text"]), on="doc_id",
                                  how="inner"),
                f"instantiations[{shard}] -> documents")
            llm = LLMCall(engine, cache, GenerationStats())  # per chunk: a part's counts are its own
            kept, quarantined, stats = judge_instantiations(pending, llm, cfg.judge_sampling, cfg.max_document_chars,
                                                            cfg.max_feedback_chars, context.run_id, judge_format)
            return ChunkOutput(kept, quarantined, stats)

        with storage.generation_cache() as cache:
            run = run_chunked(
                store, "judgements", shard,
                chunks_of(source, cfg.chunk_rows, "doc_id",
                          ["instantiation_id", "doc_id", "shard", "instruction", "answer"]),
                "instantiation_id", definition, process, pl.DataFrame(schema=JUDGEMENT_SCHEMA),
                pl.DataFrame(schema=BASE_SCHEMA | QUARANTINE_EXTRA), count_rows(source), progress_reporter(context))
        kept = pl.scan_parquet(store.path("judgements", shard))
        hist = {int(s): int(n) for s, n in
                kept.group_by("score").len().sort("score").collect().iter_rows()}
        bad = kept.filter(~pl.col("score").is_between(1, 5) | pl.col("feedback").is_null()).select(pl.len())
        ok = bad.collect().item() == 0
        return MaterializeResult(
            metadata=stage_metadata(run.stats, kept.head(5).collect(), ["judgement_id", "score", "feedback"],
                                    score_histogram=hist, judge_format=judge_format,
                                    **throughput_metadata(run)),
            check_results=[AssetCheckResult(check_name=SCORES_ON_SCALE, passed=ok, metadata={"histogram": hist})])

    return for_each_partition(context, one)
