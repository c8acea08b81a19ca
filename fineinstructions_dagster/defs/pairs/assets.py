"""`fineinstructions` (the final pairs of a shard) and `dataset_report` (the whole dataset)."""

from functools import partial

import polars as pl
from dagster import (
    AssetCheckResult,
    AssetCheckSeverity,
    AssetCheckSpec,
    AssetExecutionContext,
    AssetKey,
    AssetSpec,
    MaterializeResult,
    MetadataValue,
    asset,
    multi_asset,
)

from fineinstructions_dagster.config import PipelineConfig
from fineinstructions_dagster.defs.automation import over_every_partition, shard_step
from fineinstructions_dagster.defs.decontamination.assets import BENCHMARK_NGRAMS, load_index
from fineinstructions_dagster.defs.metadata import (
    control_metadata,
    explore_links,
    for_each_partition,
    preview_markdown,
    progress_reporter,
    stage_metadata,
    throughput_metadata,
)
from fineinstructions_dagster.defs.partitions import batched_backfill, corpus_shard_partitions
from fineinstructions_dagster.defs.resources import InputsResource, LLMResource, PipelineResource, StorageResource
from fineinstructions_dagster.defs.settings import GATE_SETTINGS, budget_tokenizer
from fineinstructions_dagster.lib.chunks import (
    ChunkOutput,
    chunks_of,
    count_rows,
    definition_hash,
    rows_for,
    run_chunked,
)
from fineinstructions_dagster.lib.storage import TableStore
from fineinstructions_dagster.lib.versions import code_version
from fineinstructions_dagster.stages import controls as controls_stage
from fineinstructions_dagster.stages import pairs as pairs_stage
from fineinstructions_dagster.stages import report as report_stage
from fineinstructions_dagster.stages.controls import control_figures, wilson_lower_bound
from fineinstructions_dagster.stages.export import token_counter
from fineinstructions_dagster.stages.pairs import (
    QUARANTINED_TABLES,
    benchmark_overlap_counts,
    gate_controls,
    rejection_counts,
    select_pairs,
    shard_controls,
    template_share_overflow,
)
from fineinstructions_dagster.stages.pairs import dataset_report as build_report
from fineinstructions_dagster.stages.report import stage_quality

CODE_VERSION = code_version(pairs_stage, controls_stage)

LINEAGE_COMPLETE = "every_pair_has_full_lineage"
CONTROLS_REJECTED = "gates_reject_control_pairs"
CONTROL_OUTCOMES = "control_outcomes"
LINEAGE_ID_COLUMNS = ["pair_id", "judgement_id", "instantiation_id", "match_id", "template_id", "query_id",
                      "doc_id"]
_COMMON = {"deps": [AssetKey("judgements"), AssetKey("control_judgements"), "instantiations", "matches", "documents",
                    "template_bank", GATE_SETTINGS.key, BENCHMARK_NGRAMS],
           "group_name": "pairs", "automation_condition": shard_step(), "code_version": CODE_VERSION}


@multi_asset(
    name="fineinstructions", partitions_def=corpus_shard_partitions, backfill_policy=batched_backfill,
    specs=[AssetSpec("fineinstructions", kinds={"duckdb", "parquet"}, **_COMMON,
                     description="The shard's instruction/answer pairs that pass every gate, with full lineage."),
           AssetSpec(CONTROL_OUTCOMES, kinds={"polars", "parquet"}, **_COMMON,
                     description="What the same gates did with the shard's control pairs (kept, or the reason); "
                                 "never exported.")],
    check_specs=[AssetCheckSpec(LINEAGE_COMPLETE, asset="fineinstructions"),
                 AssetCheckSpec(CONTROLS_REJECTED, asset="fineinstructions", blocking=True,
                                description="the gates keep at most max_control_kept_share of the shard's control "
                                            "pairs (another document's answer, or an unused passage of its own); "
                                            "blocks the export (a warning only under the smoke profile)")])
def fineinstructions(context: AssetExecutionContext, storage: StorageResource,
                     pipeline: PipelineResource, inputs: InputsResource,
                     instantiator_llm: LLMResource):  # noqa: ANN201 - yields results
    """The instruction/answer pairs of one shard that pass every gate (judge threshold, grounding, relevance,
    validity), each with the ids of its judgement, instantiation, match, template, query and document and the
    run ids of every step; joined `chunk_rows` judgements at a time. The shard's control pairs go through the same
    gates into `control_outcomes`; a shard whose gates keep too many of them fails its control check."""
    cfg = pipeline.config()
    gates = cfg.final_gates()
    store = storage.store()
    bank = store.read("template_bank").select("template_id", "template", "query_ids", "run_id")
    benchmarks, index_metadata = load_index(store, pipeline, inputs)
    # The bank's rows are joined into every pair (query ids, bank run): a changed bank must not reuse a part; nor
    # may a part made against other benchmark files.
    budgets = cfg.budgets()
    # the export's tokenizer, loaded once per process
    count_tokens = token_counter(budget_tokenizer(cfg, instantiator_llm)) if budgets.counts_tokens else None
    gate_version = GATE_SETTINGS.version({"pipeline": pipeline, "instantiator_llm": instantiator_llm})
    definition = definition_hash("fineinstructions", CODE_VERSION, gate_version,
                                 bank.select("template_id", "run_id").sort("template_id").rows(),
                                 index_metadata["benchmarks_version"])

    def one(shard: str) -> list[MaterializeResult]:
        source = store.file("judgements", shard)
        upstream = {t: store.file(t, shard) for t in ("instantiations", "matches", "documents")}

        def process(chunk: pl.DataFrame) -> ChunkOutput:
            ids = chunk["doc_id"]  # every upstream table of the shard is sorted by doc_id: read that range only
            inst, found, docs = (rows_for(upstream[t], "doc_id", ids) for t in upstream)
            pairs, rejected, stats = select_pairs(chunk, inst, found, docs, bank, gates, context.run_id, benchmarks,
                                                  budgets, count_tokens)
            return ChunkOutput(pairs, rejected, stats)

        def process_controls(chunk: pl.DataFrame) -> ChunkOutput:
            outcomes, stats = gate_controls(chunk, gates, context.run_id)
            return ChunkOutput(outcomes, outcomes.head(0), stats)

        empty = process(pl.read_parquet(source, n_rows=0))
        # a template's pairs span the shard's chunks: its share is capped once over all of them
        template_share = (partial(template_share_overflow, max_share=budgets.max_template_share)
                          if budgets.max_template_share > 0 else None)
        run = run_chunked(store, "fineinstructions", shard, chunks_of(source, cfg.chunk_rows, "doc_id"),
                          "judgement_id", definition, process, empty.kept, empty.quarantined, count_rows(source),
                          progress_reporter(context), finish=template_share)
        control_source = store.file("control_judgements", shard)
        empty_controls = process_controls(pl.read_parquet(control_source, n_rows=0)).kept
        control_run = run_chunked(store, CONTROL_OUTCOMES, shard, chunks_of(control_source, cfg.chunk_rows, None),
                                  "control_id", definition, process_controls, empty_controls, empty_controls.head(0),
                                  count_rows(control_source))
        pairs = pl.scan_parquet(store.path("fineinstructions", shard))
        incomplete = pairs.select(pl.any_horizontal(pl.col(c).is_null() for c in LINEAGE_ID_COLUMNS).sum()).collect()
        figures = shard_control_figures(store, shard)
        check = control_check(*judged_controls_kept(store, shard), cfg.max_control_kept_share,
                              cfg.control_check_blocks, shard)
        extra = {"profile": cfg.profile, **index_metadata}
        if cfg.relaxed:
            extra["warning"] = cfg.describe_relaxations()
        shard_page, links = explore_links(shard)
        judged = run.stats.total + count_rows(store.path("judgements", shard, quarantine=True))
        return [
            MaterializeResult(
                asset_key="fineinstructions",
                metadata=stage_metadata(run.stats, pairs.head(20).collect(),
                                        ["pair_id", "template_id", "doc_id", "instruction", "answer", "judge_score",
                                         "grounding", "relevance"], preview_rows=20, links=links, **shard_page,
                                        **extra, pairs_kept_share=round(run.stats.kept / judged, 4) if judged else 0.0,
                                        **control_metadata(figures), **throughput_metadata(run)),
                check_results=[AssetCheckResult(check_name=LINEAGE_COMPLETE, passed=incomplete.item() == 0), check]),
            MaterializeResult(
                asset_key=CONTROL_OUTCOMES,
                metadata={**stage_metadata(control_run.stats), "dagster/row_count": control_run.stats.total,
                          "preview": MetadataValue.md(preview_markdown(
                              pl.read_parquet(store.path(CONTROL_OUTCOMES, shard), n_rows=10),
                              ["control_id", "control_kind", "judge_score", "grounding", "relevance", "kept",
                               "reason"], rows=10))}),
        ]

    yield from for_each_partition(context, one)


def shard_control_figures(store: TableStore, shard: str) -> dict[str, object]:
    return control_figures(*shard_controls(store, shard))


def judged_controls_kept(store: TableStore, shard: str) -> tuple[int, int]:
    """(judged control pairs, of them kept by the gates) of the shard."""
    row = (pl.scan_parquet(store.path(CONTROL_OUTCOMES, shard)).filter(pl.col("judged"))
           .select(pl.len(), pl.col("kept").sum()).collect().row(0))
    return int(row[0]), int(row[1] or 0)


def control_check(n: int, kept: int, max_share: float, blocks: bool, shard: str) -> AssetCheckResult:
    """Whether the shard's gates filter: it fails when the gates keep more than `max_share` of its judged control
    pairs beyond chance (the 95% Wilson lower bound of the kept share is above it: 10 of 10 kept fails, 2 of 10
    does not prove anything). Under a profile whose gates are relaxed on purpose (`blocks` False) an excess is a
    warning on a passing check, so automation still exports its (test) data."""
    share = kept / n if n else 0.0
    lower = wilson_lower_bound(kept, n)
    over = lower > max_share
    passed = not over or not blocks
    said = f"the gates kept {kept} of {n} control pairs ({share:.1%}; 95% lower bound {lower:.1%})"
    if n == 0:
        description = f"shard {shard}: no control pairs could be made (too few documents or passages): not measured"
    elif not over:
        description = f"shard {shard}: {said}, not above {max_share:.0%}"
    elif blocks:
        description = f"shard {shard}: {said} > {max_share:.0%}: they are not filtering; its export is blocked"
    else:
        description = f"shard {shard}: {said} > {max_share:.0%}: relaxed on purpose under this profile (warning only)"
    return AssetCheckResult(check_name=CONTROLS_REJECTED, passed=passed, description=description,
                            severity=AssetCheckSeverity.WARN if over and not blocks else AssetCheckSeverity.ERROR,
                            metadata={"controls": n, "controls_kept": kept, "controls_kept_share": round(share, 4),
                                      "kept_share_lower_bound": round(lower, 4), "max_control_kept_share": max_share})


@asset(automation_condition=over_every_partition(),
       # the pairs, and every stage's quarantine (the report's drop reasons)
       deps=[AssetKey("fineinstructions"), AssetKey(CONTROL_OUTCOMES),
             *(t for t in QUARANTINED_TABLES if t != "fineinstructions")], group_name="pairs",
       kinds={"polars"}, code_version=code_version(pairs_stage, controls_stage, report_stage))
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
    report["benchmark_overlaps"] = benchmark_overlap_counts(store)  # table -> benchmark -> rows removed
    cfg, paper = pipeline.config(), PipelineConfig()

    def current(table: str) -> pl.LazyFrame | None:
        scan = store.scan_all(table)
        return None if scan is None else scan.filter(pl.col("shard").is_in(sorted(shards)))

    report["quality"] = stage_quality(
        store.scan_all("templates"), current("instantiations"), current("judgements"), pairs, report["rejections"],
        cfg.judge_threshold, cfg.min_grounding,
        {"judge_threshold": paper.judge_threshold, "min_grounding": paper.min_grounding,
         "min_instruction_words": paper.min_instruction_words, "min_answer_words": paper.min_answer_words})
    # the control pairs: per shard and over all, what the gates kept and how well each signal separates them
    per_shard = {shard: shard_controls(store, shard) for shard in parts if store.exists(CONTROL_OUTCOMES, shard)}
    report["controls"] = {
        "all": control_figures(*(pl.concat([f[i] for f in per_shard.values()], how="diagonal_relaxed")
                                 for i in (0, 1))) if per_shard else {},
        "shards": {shard: control_figures(*frames) for shard, frames in sorted(per_shard.items())},
        "max_control_kept_share": cfg.max_control_kept_share}
    report["profile"] = cfg.profile
    report["gates"] = cfg.gates()
    path = store.write_json("dataset_report/report.json", report)
    return MaterializeResult(metadata={
        "dagster/row_count": int(report["pairs"]),  # type: ignore[call-overload]
        "report": MetadataValue.json(report),
        "path": MetadataValue.path(store.uri_of(path)),
    })

