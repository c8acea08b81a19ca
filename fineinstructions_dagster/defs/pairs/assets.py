"""`fineinstructions` (the final pairs of a shard) and `dataset_report` (the whole dataset)."""

import polars as pl
from dagster import (
    AssetCheckResult,
    AssetCheckSpec,
    AssetExecutionContext,
    MaterializeResult,
    MetadataValue,
    asset,
)

from fineinstructions_dagster.config import PipelineConfig
from fineinstructions_dagster.defs.automation import over_every_partition, shard_step
from fineinstructions_dagster.defs.judging.assets import judgements
from fineinstructions_dagster.defs.metadata import (
    explore_links,
    for_each_partition,
    progress_reporter,
    stage_metadata,
    throughput_metadata,
)
from fineinstructions_dagster.defs.partitions import batched_backfill, corpus_shard_partitions
from fineinstructions_dagster.defs.resources import PipelineResource, StorageResource
from fineinstructions_dagster.lib.chunks import (
    ChunkOutput,
    chunks_of,
    count_rows,
    definition_hash,
    rows_for,
    run_chunked,
)
from fineinstructions_dagster.stages.pairs import QUARANTINED_TABLES, rejection_counts, select_pairs
from fineinstructions_dagster.stages.pairs import dataset_report as build_report
from fineinstructions_dagster.stages.report import stage_quality

LINEAGE_COMPLETE = "every_pair_has_full_lineage"
LINEAGE_ID_COLUMNS = ["pair_id", "judgement_id", "instantiation_id", "match_id", "template_id", "query_id",
                      "doc_id"]


@asset(partitions_def=corpus_shard_partitions, backfill_policy=batched_backfill, automation_condition=shard_step(),
       deps=[judgements, "instantiations", "matches", "documents", "template_bank"],
       group_name="pairs",
       kinds={"duckdb", "parquet"}, check_specs=[AssetCheckSpec(LINEAGE_COMPLETE, asset="fineinstructions")])
def fineinstructions(context: AssetExecutionContext, storage: StorageResource,
                     pipeline: PipelineResource) -> MaterializeResult:
    """The instruction/answer pairs of one shard that pass every gate (judge threshold, grounding,
    validity), each with the ids of its judgement, instantiation, match, template, query and document
    and the run ids of every step; joined `chunk_rows` judgements at a time."""
    cfg = pipeline.config()
    store = storage.store()
    bank = store.read("template_bank").select("template_id", "template", "query_ids", "run_id")
    # The bank's rows are joined into every pair (query ids, bank run): a changed bank must not reuse a part.
    definition = definition_hash("fineinstructions", cfg.judge_threshold, cfg.min_grounding,
                                 bank.select("template_id", "run_id").sort("template_id").rows())

    def one(shard: str) -> MaterializeResult:
        source = store.file("judgements", shard)
        upstream = {t: store.file(t, shard) for t in ("instantiations", "matches", "documents")}

        def process(chunk: pl.DataFrame) -> ChunkOutput:
            ids = chunk["doc_id"]  # every upstream table of the shard is sorted by doc_id: read that range only
            inst, found, docs = (rows_for(upstream[t], "doc_id", ids) for t in upstream)
            pairs, rejected, stats = select_pairs(chunk, inst, found, docs, bank, cfg.judge_threshold,
                                                  cfg.min_grounding, context.run_id)
            return ChunkOutput(pairs, rejected, stats)

        empty = process(pl.read_parquet(source, n_rows=0))
        run = run_chunked(store, "fineinstructions", shard, chunks_of(source, cfg.chunk_rows, "doc_id"),
                          "judgement_id", definition, process, empty.kept, empty.quarantined, count_rows(source),
                          progress_reporter(context))
        pairs = pl.scan_parquet(store.path("fineinstructions", shard))
        incomplete = pairs.select(pl.any_horizontal(pl.col(c).is_null() for c in LINEAGE_ID_COLUMNS).sum()).collect()
        extra = {"profile": cfg.profile}
        if cfg.relaxed:
            extra["warning"] = cfg.describe_relaxations()
        shard_page, links = explore_links(shard)
        return MaterializeResult(
            metadata=stage_metadata(run.stats, pairs.head(20).collect(),
                                    ["pair_id", "template_id", "doc_id", "instruction", "answer", "judge_score",
                                     "grounding"], preview_rows=20, links=links, **shard_page, **extra,
                                    **throughput_metadata(run)),
            check_results=[AssetCheckResult(check_name=LINEAGE_COMPLETE, passed=incomplete.item() == 0)],
        )

    return for_each_partition(context, one)


@asset(automation_condition=over_every_partition(),
       # the pairs, and every stage's quarantine (the report's drop reasons)
       deps=[fineinstructions, *(t for t in QUARANTINED_TABLES if t != "fineinstructions")], group_name="pairs",
       kinds={"polars"})
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
    cfg, paper = pipeline.config(), PipelineConfig()

    def current(table: str) -> pl.LazyFrame | None:
        scan = store.scan_all(table)
        return None if scan is None else scan.filter(pl.col("shard").is_in(sorted(shards)))

    report["quality"] = stage_quality(
        store.scan_all("templates"), current("instantiations"), current("judgements"), pairs, report["rejections"],
        cfg.judge_threshold, cfg.min_grounding,
        {"judge_threshold": paper.judge_threshold, "min_grounding": paper.min_grounding,
         "min_instruction_words": paper.min_instruction_words, "min_answer_words": paper.min_answer_words})
    report["profile"] = cfg.profile
    report["gates"] = cfg.gates()
    path = store.write_json("dataset_report/report.json", report)
    return MaterializeResult(metadata={
        "dagster/row_count": int(report["pairs"]),  # type: ignore[call-overload]
        "report": MetadataValue.json(report),
        "path": MetadataValue.path(store.uri_of(path)),
    })

