"""`templates` (genericizer output per query source) and `template_bank` (all templates, deduplicated)."""

import polars as pl
from dagster import (
    AssetCheckResult,
    AssetCheckSpec,
    AssetExecutionContext,
    MaterializeResult,
    asset,
)

from fineinstructions_dagster.defs.automation import input_files_replaced, over_every_partition
from fineinstructions_dagster.defs.decontamination.assets import BENCHMARK_NGRAMS, load_index
from fineinstructions_dagster.defs.metadata import for_each_partition, stage_metadata
from fineinstructions_dagster.defs.partitions import batched_backfill, query_source_partitions
from fineinstructions_dagster.defs.queries.assets import user_queries
from fineinstructions_dagster.defs.resources import InputsResource, LLMResource, PipelineResource, StorageResource
from fineinstructions_dagster.defs.settings import TEMPLATE_SETTINGS
from fineinstructions_dagster.lib.versions import code_version
from fineinstructions_dagster.llm.cache import GenerationStats
from fineinstructions_dagster.llm.engines import runs_deterministically
from fineinstructions_dagster.prompts import genericize
from fineinstructions_dagster.stages import templates as templates_stage
from fineinstructions_dagster.stages.llm_calls import LLMCall
from fineinstructions_dagster.stages.templates import build_template_bank, genericize_queries

CODE_VERSION = code_version(templates_stage, genericize)

TEMPLATES_HAVE_SLOTS = "every_template_has_a_slot"
BANK_IDS_RESOLVE = "template_ids_unique_with_source_queries"


@asset(
    partitions_def=query_source_partitions,
    backfill_policy=batched_backfill,
    deps=[user_queries, TEMPLATE_SETTINGS.key, BENCHMARK_NGRAMS],
    automation_condition=input_files_replaced(),  # its query source's files replaced, user_queries re-made
    group_name="templates", code_version=CODE_VERSION,
    kinds={"vllm", "parquet"},
    pool="gpu",
    check_specs=[AssetCheckSpec(TEMPLATES_HAVE_SLOTS, asset="templates")],
)
def templates(context: AssetExecutionContext, storage: StorageResource, genericizer_llm: LLMResource,
              pipeline: PipelineResource, inputs: InputsResource) -> MaterializeResult:
    """The genericizer's template and compatible document description for each query; outputs that
    do not parse or validate, or share an n-gram with a benchmark item, go to quarantine with the reason (and the
    raw model output, or the benchmark item)."""
    cfg = pipeline.config()
    store = storage.store()
    benchmarks, index_metadata = load_index(store, pipeline, inputs)

    def one(source: str) -> MaterializeResult:
        queries = store.read("user_queries", source)
        with storage.generation_cache() as cache:
            llm = LLMCall(genericizer_llm.engine(), cache, GenerationStats())
            kept, quarantined, stats = genericize_queries(queries, llm, cfg.genericizer_sampling,
                                                          cfg.max_template_chars, cfg.max_description_chars,
                                                          context.run_id,
                                                          cfg.format_for("genericizer", llm.engine.info.model),
                                                          benchmarks)
        store.write("templates", kept, source)
        store.write("templates", quarantined, source, quarantine=True)
        return MaterializeResult(
            metadata=stage_metadata(stats, kept, ["template_id", "query_id", "template",
                                                  "compatible_document_description"],
                                    model=llm.engine.info.model, profile=cfg.profile,
                                    llm_deterministic=runs_deterministically(llm.engine.info), **index_metadata),
            check_results=[AssetCheckResult(check_name=TEMPLATES_HAVE_SLOTS,
                                            passed=bool(kept.height == 0 or kept["n_slots"].min() >= 1))],
        )

    return for_each_partition(context, one)


@asset(automation_condition=over_every_partition(),
       deps=[templates], group_name="templates", kinds={"polars", "parquet"}, code_version=CODE_VERSION,
       check_specs=[AssetCheckSpec(BANK_IDS_RESOLVE, asset="template_bank",
                                   description="template_id unique; every template keeps at least one query_id")])
def template_bank(context: AssetExecutionContext, storage: StorageResource) -> MaterializeResult:
    """Every valid template across query sources, merged by template text; each keeps the ids of all
    the queries it came from. Only sources that are current partitions are read."""
    store = storage.store()
    current = set(context.instance.get_dynamic_partitions(query_source_partitions.name))
    parts = [p for p in store.partitions("templates") if p in current]
    if not parts:
        raise ValueError("no materialized `templates` partition: materialize user_queries and templates first")
    all_templates = pl.concat([store.read("templates", p) for p in parts], how="diagonal_relaxed")
    bank, stats = build_template_bank(all_templates, context.run_id)
    store.write("template_bank", bank)
    ok = bank.height > 0 and bool(bank["template_id"].is_unique().all()) and \
        bool((bank["query_ids"].list.len() >= 1).all())
    return MaterializeResult(
        metadata=stage_metadata(stats, bank, ["template_id", "template", "n_queries"], sources=", ".join(parts)),
        check_results=[AssetCheckResult(check_name=BANK_IDS_RESOLVE, passed=ok)])
