"""`judgements` and `control_judgements`: the LLM judge's Likert score and feedback per instantiation, and for the
shard's control pairs (stages/controls.py), judged in the same engine batches, chunk by chunk."""

import polars as pl
from dagster import (
    AssetCheckResult,
    AssetCheckSpec,
    AssetExecutionContext,
    AssetSpec,
    MaterializeResult,
    MetadataValue,
    multi_asset,
)

from fineinstructions_dagster.defs.automation import shard_step
from fineinstructions_dagster.defs.instantiation.assets import instantiations
from fineinstructions_dagster.defs.metadata import (
    for_each_partition,
    preview_markdown,
    progress_reporter,
    require_all_joined,
    stage_metadata,
    throughput_metadata,
)
from fineinstructions_dagster.defs.partitions import batched_backfill, corpus_shard_partitions
from fineinstructions_dagster.defs.resources import LLMResource, PipelineResource, RelevanceResource, StorageResource
from fineinstructions_dagster.defs.settings import JUDGING_SETTINGS
from fineinstructions_dagster.lib.chunks import (
    ChunkOutput,
    chunks_of,
    count_rows,
    definition_hash,
    rows_for,
    run_chunked,
)
from fineinstructions_dagster.lib.versions import code_version
from fineinstructions_dagster.llm.cache import GenerationStats
from fineinstructions_dagster.llm.engines import runs_deterministically
from fineinstructions_dagster.prompts import judge
from fineinstructions_dagster.stages import controls as controls_stage
from fineinstructions_dagster.stages import judging as judging_stage
from fineinstructions_dagster.stages import relevance as relevance_stage
from fineinstructions_dagster.stages.controls import CONTROL_SCHEMA, build_controls, controls_in_chunk
from fineinstructions_dagster.stages.judging import BASE_SCHEMA, JUDGEMENT_SCHEMA, judge_with_controls
from fineinstructions_dagster.stages.llm_calls import QUARANTINE_EXTRA, LLMCall

CODE_VERSION = code_version(judging_stage, controls_stage, relevance_stage, judge)

SCORES_ON_SCALE = "judge_scores_on_likert_scale"
CONTROLS = "control_judgements"
_COMMON = {"deps": [instantiations, "documents", "template_bank", JUDGING_SETTINGS.key], "group_name": "judging",
           "automation_condition": shard_step(), "code_version": CODE_VERSION}


@multi_asset(
    name="judgements", partitions_def=corpus_shard_partitions, backfill_policy=batched_backfill, pool="gpu",
    specs=[AssetSpec("judgements", kinds={"vllm", "parquet"}, **_COMMON,
                     description="The judge's 1-5 score and feedback for each instantiated pair."),
           AssetSpec(CONTROLS, kinds={"vllm", "parquet"}, **_COMMON,
                     description="The shard's control pairs (an instruction with another document's answer, or "
                                 "with another passage of its own document), judged like the real pairs; never "
                                 "exported.")],
    check_specs=[AssetCheckSpec(SCORES_ON_SCALE, asset="judgements",
                                description="every kept judgement has an integer score in 1..5 and feedback")])
def judgements(context: AssetExecutionContext, storage: StorageResource, judge_llm: LLMResource,
               pipeline: PipelineResource, relevance: RelevanceResource):  # noqa: ANN201 - yields results
    """A 1-5 Likert score with feedback for each instantiated pair, judged against its document; the shard's
    instantiations are read `chunk_rows` at a time and each chunk kept as a part, so a killed run resumes. A share
    of each chunk's pairs (`control_share`, at least the chunk's part of `min_controls_per_shard`, by content
    hash) gets control twins, judged in the same engine calls and written to `control_judgements`."""
    cfg = pipeline.config()
    store = storage.store()
    engine = judge_llm.engine()
    scorer = relevance.scorer()
    judge_format = cfg.format_for("judge", engine.info.model)
    bank = store.read("template_bank").select("template_id", "template")
    # the code (prompts, schemas, control choice: CODE_VERSION), the backend it resolved, the settings in force
    definition = definition_hash("judgements", CODE_VERSION, engine.info.backend, JUDGING_SETTINGS.version(
        {"pipeline": pipeline, "judge_llm": judge_llm, "relevance": relevance}))

    def one(shard: str) -> list[MaterializeResult]:
        source, docs = store.file("instantiations", shard), store.file("documents", shard)
        shard_rows = count_rows(source)

        def process(chunk: pl.DataFrame) -> ChunkOutput:
            # the template: the controls' instantiation gates and fill signals read it, as the real pairs' did
            pending = require_all_joined(
                chunk, chunk.join(rows_for(docs, "doc_id", chunk["doc_id"], ["doc_id", "text"]), on="doc_id",
                                  how="inner").join(bank, on="template_id", how="inner"),
                f"instantiations[{shard}] -> documents/template_bank")
            controls = build_controls(
                pending, controls_in_chunk(chunk.height, shard_rows, cfg.control_share, cfg.min_controls_per_shard),
                context.run_id, cfg.min_answer_words, cfg.min_instruction_words, scorer.score, scorer.name,
                cfg.max_document_chars)
            llm = LLMCall(engine, cache, GenerationStats())  # per chunk: a part's counts are its own
            kept, quarantined, judged_controls, stats = judge_with_controls(
                pending, controls, pending.select("doc_id", "text"), llm, cfg.judge_sampling, cfg.max_document_chars,
                cfg.max_feedback_chars, context.run_id, judge_format)
            return ChunkOutput(kept, quarantined, stats, side={CONTROLS: judged_controls})

        with storage.generation_cache() as cache:
            run = run_chunked(
                store, "judgements", shard,
                chunks_of(source, cfg.chunk_rows, "doc_id",
                          ["instantiation_id", "doc_id", "template_id", "shard", "instruction", "answer",
                           "relevance_baseline"]),
                "instantiation_id", definition, process, pl.DataFrame(schema=JUDGEMENT_SCHEMA),
                pl.DataFrame(schema=BASE_SCHEMA | QUARANTINE_EXTRA), shard_rows, progress_reporter(context),
                side_tables={CONTROLS: pl.DataFrame(schema=CONTROL_SCHEMA)})
        kept = pl.scan_parquet(store.path("judgements", shard))
        hist = {int(s): int(n) for s, n in
                kept.group_by("score").len().sort("score").collect().iter_rows()}
        bad = kept.filter(~pl.col("score").is_between(1, 5) | pl.col("feedback").is_null()).select(pl.len())
        ok = bad.collect().item() == 0
        controls = pl.scan_parquet(store.path(CONTROLS, shard))
        by_kind = {k: int(n) for k, n in controls.group_by("control_kind").len().sort("control_kind")
                   .collect().iter_rows()}
        return [
            MaterializeResult(
                asset_key="judgements",
                metadata=stage_metadata(run.stats, kept.head(5).collect(), ["judgement_id", "score", "feedback"],
                                        score_histogram=hist, judge_format=judge_format,
                                        llm_deterministic=runs_deterministically(engine.info),
                                        **throughput_metadata(run)),
                check_results=[AssetCheckResult(check_name=SCORES_ON_SCALE, passed=ok, metadata={"histogram": hist})]),
            MaterializeResult(
                asset_key=CONTROLS,
                metadata={"dagster/row_count": sum(by_kind.values()), "controls_by_kind": by_kind,
                          "relevance_model": scorer.name,
                          "preview": preview_controls(controls.head(5).collect())}),
        ]

    yield from for_each_partition(context, one)


def preview_controls(frame: pl.DataFrame) -> MetadataValue:
    return MetadataValue.md(preview_markdown(frame, ["control_id", "control_kind", "instruction", "answer", "score",
                                                     "relevance"]))
