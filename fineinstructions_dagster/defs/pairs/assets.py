"""`fineinstructions` (the final pairs of a shard) and `dataset_report` (the whole dataset)."""

import polars as pl
from dagster import (
    AssetCheckResult,
    AssetCheckSpec,
    AssetExecutionContext,
    AutomationCondition,
    MaterializeResult,
    MetadataValue,
    asset,
)

from fineinstructions_dagster.defs.judging.assets import judgements
from fineinstructions_dagster.defs.metadata import for_each_partition, stage_metadata
from fineinstructions_dagster.defs.partitions import batched_backfill, corpus_shard_partitions
from fineinstructions_dagster.defs.resources import PipelineResource, StorageResource
from fineinstructions_dagster.stages.pairs import dataset_report as build_report
from fineinstructions_dagster.stages.pairs import rejection_counts, select_pairs

LINEAGE_COMPLETE = "every_pair_has_full_lineage"
LINEAGE_ID_COLUMNS = ["pair_id", "judgement_id", "instantiation_id", "match_id", "template_id", "query_id",
                      "doc_id"]


@asset(partitions_def=corpus_shard_partitions, backfill_policy=batched_backfill, deps=[judgements],
       group_name="pairs",
       kinds={"duckdb", "parquet"}, check_specs=[AssetCheckSpec(LINEAGE_COMPLETE, asset="fineinstructions")])
def fineinstructions(context: AssetExecutionContext, storage: StorageResource,
                     pipeline: PipelineResource) -> MaterializeResult:
    """The instruction/answer pairs of one shard that pass every gate (judge threshold, grounding,
    validity), each with the ids of its judgement, instantiation, match, template, query and document
    and the run ids of every step."""
    cfg = pipeline.config()
    store = storage.store()

    def one(shard: str) -> MaterializeResult:
        pairs, rejected, stats = select_pairs(
            store.read("judgements", shard), store.read("instantiations", shard), store.read("matches", shard),
            store.read("documents", shard), store.read("template_bank"), cfg.judge_threshold, cfg.min_grounding,
            context.run_id)
        store.write("fineinstructions", pairs, shard)
        store.write("fineinstructions", rejected, shard, quarantine=True)
        complete = pairs.height == 0 or not pairs.select(pl.any_horizontal(
            pl.col(c).is_null() for c in LINEAGE_ID_COLUMNS)).to_series().any()
        extra = {"profile": cfg.profile}
        if cfg.relaxed:
            extra["warning"] = cfg.describe_relaxations()
        return MaterializeResult(
            metadata=stage_metadata(stats, pairs, ["pair_id", "template_id", "doc_id", "instruction", "answer",
                                                          "judge_score", "grounding"],
                                    **extra),
            check_results=[AssetCheckResult(check_name=LINEAGE_COMPLETE, passed=bool(complete))],
        )

    return for_each_partition(context, one)


@asset(automation_condition=AutomationCondition.eager(),
       deps=[fineinstructions], group_name="pairs", kinds={"polars"})
def dataset_report(context: AssetExecutionContext, storage: StorageResource,
                   pipeline: PipelineResource) -> MaterializeResult:
    """Counts, drop reasons per stage, template diversity and score histograms over every shard."""
    store = storage.store()
    shards = set(context.instance.get_dynamic_partitions(corpus_shard_partitions.name))
    parts = [p for p in store.partitions("fineinstructions") if p in shards]
    pairs = pl.concat([store.read("fineinstructions", p) for p in parts], how="diagonal_relaxed") if parts \
        else pl.DataFrame(schema={"pair_id": pl.String})
    report = build_report(pairs)
    report["rejections"] = rejection_counts(store)
    report["profile"] = pipeline.config().profile
    path = store.write_json("dataset_report/report.json", report)
    return MaterializeResult(metadata={
        "dagster/row_count": int(report["pairs"]),  # type: ignore[call-overload]
        "report": MetadataValue.json(report),
        "path": MetadataValue.path(store.uri_of(path)),
    })

