"""`templates` (genericizer output per query source) and `template_bank` (all templates, deduplicated)."""

import polars as pl
from dagster import (
    AssetCheckResult,
    AssetCheckSpec,
    AssetExecutionContext,
    MaterializeResult,
    asset,
)

from fineinstructions_dagster.defs.metadata import stage_metadata
from fineinstructions_dagster.defs.partitions import query_source_partitions
from fineinstructions_dagster.defs.queries.assets import user_queries
from fineinstructions_dagster.defs.resources import LLMResource, PipelineResource, StorageResource
from fineinstructions_dagster.llm.cache import GenerationStats
from fineinstructions_dagster.stages.llm_calls import LLMCall
from fineinstructions_dagster.stages.templates import build_template_bank, genericize_queries

TEMPLATES_HAVE_SLOTS = "every_template_has_a_slot"


@asset(
    partitions_def=query_source_partitions,
    deps=[user_queries],
    group_name="templates",
    kinds={"vllm", "parquet"},
    pool="gpu",
    check_specs=[AssetCheckSpec(TEMPLATES_HAVE_SLOTS, asset="templates")],
)
def templates(context: AssetExecutionContext, storage: StorageResource, genericizer_llm: LLMResource,
              pipeline: PipelineResource) -> MaterializeResult:
    """The genericizer's template and compatible document description for each query; outputs that
    do not parse or validate go to quarantine with the reason and the raw model output."""
    cfg = pipeline.config()
    store = storage.store()
    queries = store.read("user_queries", context.partition_key)
    with storage.generation_cache() as cache:
        llm = LLMCall(genericizer_llm.engine(), cache, GenerationStats())
        kept, quarantined, stats = genericize_queries(queries, llm, cfg.genericizer_sampling,
                                                      cfg.max_template_chars, cfg.max_description_chars, context.run_id,
                                                      cfg.genericizer_format)
    store.write("templates", kept, context.partition_key)
    store.write("templates", quarantined, context.partition_key, quarantine=True)
    return MaterializeResult(
        metadata=stage_metadata(stats, kept, ["query_text", "template", "compatible_document_description"],
                                model=llm.engine.info.model, profile=cfg.profile),
        check_results=[AssetCheckResult(check_name=TEMPLATES_HAVE_SLOTS,
                                        passed=bool(kept.height == 0 or kept["n_slots"].min() >= 1))],
    )


@asset(deps=[templates], group_name="templates", kinds={"polars", "parquet"})
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
    return MaterializeResult(metadata=stage_metadata(
        stats, bank, ["template_id", "template", "n_queries"], sources=", ".join(parts)))
