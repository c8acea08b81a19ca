"""`instantiations`: instruction + grounded answer per match, chunk by chunk (resumable inside a shard)."""

import polars as pl
from dagster import AssetCheckResult, AssetCheckSpec, AssetExecutionContext, MaterializeResult, asset

from fineinstructions_dagster.defs.automation import shard_step
from fineinstructions_dagster.defs.matching.assets import matches
from fineinstructions_dagster.defs.metadata import (
    for_each_partition,
    progress_reporter,
    require_all_joined,
    stage_metadata,
    throughput_metadata,
)
from fineinstructions_dagster.defs.partitions import batched_backfill, corpus_shard_partitions
from fineinstructions_dagster.defs.resources import (
    EmbedderResource,
    LLMResource,
    PipelineResource,
    RelevanceResource,
    StorageResource,
)
from fineinstructions_dagster.defs.settings import INSTANTIATION_SETTINGS
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
from fineinstructions_dagster.prompts import instantiate
from fineinstructions_dagster.stages import instantiation as instantiation_stage
from fineinstructions_dagster.stages import relevance as relevance_stage
from fineinstructions_dagster.stages.instantiation import (
    BASE_SCHEMA,
    INSTANTIATION_SCHEMA,
    instantiate_matches,
)
from fineinstructions_dagster.stages.llm_calls import QUARANTINE_EXTRA, LLMCall

CODE_VERSION = code_version(instantiation_stage, relevance_stage, instantiate)

GROUNDING_IN_RANGE = "grounding_in_unit_interval"


@asset(partitions_def=corpus_shard_partitions, backfill_policy=batched_backfill, automation_condition=shard_step(),
       deps=[matches, "documents", "template_bank", INSTANTIATION_SETTINGS.key],
       group_name="instantiation", code_version=CODE_VERSION,
       kinds={"vllm", "parquet"}, pool="gpu",
       check_specs=[AssetCheckSpec(GROUNDING_IN_RANGE, asset="instantiations")])
def instantiations(context: AssetExecutionContext, storage: StorageResource, instantiator_llm: LLMResource,
                   pipeline: PipelineResource, embedder: EmbedderResource,
                   relevance: RelevanceResource) -> MaterializeResult:
    """Each matched template filled from its document, with an answer drawn from the document and
    the share of the answer copied from it (grounding). Unusable outputs go to quarantine. The shard's matches
    are read `chunk_rows` at a time (a document's k together); each chunk's output is kept as a part on the
    storage root, so a killed run resumes where it stopped. Each kept pair's `relevance` (how well its answer answers
    its instruction) is scored by the relevance model, and its `relevance_baseline`: what the chunk's answers from
    other documents score for the same instruction (the margin gate reads the difference); in the `extract` format
    the answer sentences offered are the document's best answers to the template by the same score."""
    cfg = pipeline.config()
    store = storage.store()
    engine = instantiator_llm.engine()
    prompt_format = cfg.format_for("instantiator", engine.info.model)
    # extract: each slot is offered the document phrases the embedder puts nearest its description
    ranker = embedder.embedder() if prompt_format == "extract" else None
    scorer = relevance.scorer()
    bank = store.read("template_bank").select("template_id", "template")  # the bank, not the shard, sizes this
    # the code (prompts, schema and logic: CODE_VERSION), then the settings in force
    definition = definition_hash("instantiations", CODE_VERSION, engine.info.backend, INSTANTIATION_SETTINGS.version(
        {"pipeline": pipeline, "instantiator_llm": instantiator_llm, "embedder": embedder, "relevance": relevance}))

    def one(shard: str) -> MaterializeResult:
        source, docs = store.file("matches", shard), store.file("documents", shard)

        def process(chunk: pl.DataFrame) -> ChunkOutput:
            pending = require_all_joined(
                chunk,
                chunk.join(rows_for(docs, "doc_id", chunk["doc_id"], ["doc_id", "text"]), on="doc_id", how="inner")
                .join(bank, on="template_id", how="inner"),
                f"matches[{shard}] -> documents/template_bank")
            llm = LLMCall(engine, cache, GenerationStats())  # per chunk: a part's counts are its own
            kept, quarantined, stats = instantiate_matches(
                pending, llm, cfg.instantiator_sampling, cfg.max_document_chars, cfg.max_instruction_chars,
                cfg.max_answer_chars, context.run_id, prompt_format, cfg.min_instruction_words,
                cfg.min_answer_words, ranker.rank_by_similarity if ranker else None,
                rank_answers=scorer.rank if ranker else None, relevance=scorer.score, relevance_model=scorer.name,
                extract_answer=cfg.extract_answer, relevance_baseline=scorer.baseline)
            return ChunkOutput(kept, quarantined, stats)

        with storage.generation_cache() as cache:
            run = run_chunked(
                store, "instantiations", shard,
                chunks_of(source, cfg.chunk_rows, "doc_id", ["match_id", "doc_id", "template_id", "shard"]),
                "match_id", definition, process, pl.DataFrame(schema=INSTANTIATION_SCHEMA),
                pl.DataFrame(schema=BASE_SCHEMA | QUARANTINE_EXTRA), count_rows(source), progress_reporter(context))
        kept = pl.scan_parquet(store.path("instantiations", shard))
        summary = kept.select(pl.len().alias("n"), pl.col("grounding").mean().alias("mean"),
                              pl.col("relevance").mean().alias("relevance"),
                              pl.col("relevance_baseline").mean().alias("baseline"),
                              pl.col("relevance_baseline").is_null().sum().alias("unmeasured"),
                              pl.col("grounding").is_between(0, 1).all().alias("ok")).collect()
        return MaterializeResult(
            metadata=stage_metadata(run.stats, kept.head(5).collect(),
                                    ["instruction", "answer", "grounding", "relevance"],
                                    mean_grounding=float(summary["mean"][0] or 0.0),
                                    mean_relevance=float(summary["relevance"][0] or 0.0), relevance_model=scorer.name,
                                    mean_relevance_baseline=float(summary["baseline"][0] or 0.0),
                                    # too few other documents' answers in its chunk: the margin gate rejects these
                                    relevance_baseline_unmeasured=int(summary["unmeasured"][0]),
                                    llm_deterministic=runs_deterministically(engine.info), **throughput_metadata(run)),
            check_results=[AssetCheckResult(check_name=GROUNDING_IN_RANGE,
                                            passed=summary["n"][0] == 0 or bool(summary["ok"][0]))],
        )

    return for_each_partition(context, one)
