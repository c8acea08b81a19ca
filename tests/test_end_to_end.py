"""The whole asset graph, materialized in-process on a small real-text sample with the smoke model
(transformers backend), then every final pair's lineage traced back to a real document and query."""

from __future__ import annotations

import json

import polars as pl
import pytest
from dagster import AssetKey, materialize

from fineinstructions_dagster.cli import main as cli
from fineinstructions_dagster.runner import SHARD_STEP
from fineinstructions_dagster.stages.lineage import LINEAGE_KEYS, trace_pair


@pytest.fixture(scope="module")
def pipeline(pipeline_copy):  # noqa: ANN001, ANN201 - these tests run steps again and change the data
    return pipeline_copy

def test_every_stage_materialized_and_final_table_nonempty(pipeline):
    store, _, run = pipeline
    assert run.sources == ["python_faq"] and run.shards == ["faq", "tutorial"]
    pairs = pl.read_parquet(store.glob("fineinstructions"))
    assert pairs.height > 0 and pairs["pair_id"].is_unique().all()
    report = json.loads((store.root / "dataset_report" / "report.json").read_text())
    assert report["pairs"] == pairs.height and report["profile"] == "smoke"
    chat = pl.read_parquet(store.glob("export_chat"))
    assert sorted(chat["pair_id"]) == sorted(pairs["pair_id"])  # every final pair exported once
    packed = pl.read_parquet(store.glob("export_packed"))
    assert sorted(packed["pair_ids"].explode()) == sorted(pairs["pair_id"])
    assert (packed["answer_tokens"] > 0).all()
    _, instance, _ = pipeline
    for asset in ("templates", "instantiations", "judgements"):  # the transformers backend: fixed batches
        [record] = instance.fetch_materializations(AssetKey(asset), limit=1).records
        assert record.asset_materialization.metadata["llm_deterministic"].value is True, asset


def test_every_pair_traces_to_a_real_document_and_query(pipeline, sample_inputs):
    store, _, _ = pipeline
    faq = {json.loads(line)["text"] for line in (sample_inputs / "queries" / "python_faq.jsonl").open()}
    corpus = pl.concat([pl.read_parquet(sample_inputs / "corpus" / "tutorial.parquet").select("text", "url"),
                        pl.read_ndjson(sample_inputs / "corpus" / "faq.jsonl").select("text", "url")])
    source_docs = dict(zip(corpus["url"], corpus["text"], strict=True))
    for pair_id in pl.read_parquet(store.glob("fineinstructions"))["pair_id"]:
        chain = trace_pair(store, pair_id)
        assert set(LINEAGE_KEYS) <= set(chain)
        assert chain["query"]["text"] in faq
        assert chain["query"]["query_id"] in chain["template"]["query_ids"]
        assert chain["document"]["text"] == source_docs[chain["document"]["url"]].strip()
        assert chain["instantiation"]["match_id"] == chain["match"]["match_id"]
        assert chain["instantiation"]["raw_output"] and chain["instantiation"]["prompt"]
        assert all(chain["runs"].values())


def test_lineage_reports_the_runs_recorded_on_the_pair_not_the_current_ones(pipeline, tmp_path):
    import shutil

    from fineinstructions_dagster.lib.storage import TableStore

    store, _, _ = pipeline
    copy = tmp_path / "root"
    shutil.copytree(store.root, copy)
    pair = pl.read_parquet(store.glob("fineinstructions")).row(0, named=True)
    # the template bank was built again since (a new query source): its rows now carry another run id
    bank = TableStore(str(copy)).path("template_bank")
    pl.read_parquet(bank).with_columns(pl.lit("a-later-run").alias("run_id")).write_parquet(bank)
    runs = trace_pair(TableStore(str(copy)), pair["pair_id"])["runs"]
    assert runs["template_bank"] == pair["template_bank_run_id"] != "a-later-run"
    assert runs["instantiations"] == pair["instantiations_run_id"] and runs["fineinstructions"] == pair["run_id"]


def test_rerunning_a_shard_reproduces_it_exactly_from_the_cache(pipeline):
    store, instance, _ = pipeline
    before = {t: store.read(t, "faq") for t in ("matches", "instantiations", "judgements", "fineinstructions",
                                                "control_judgements", "control_outcomes")}
    from fineinstructions_dagster.definitions import ASSETS
    from fineinstructions_dagster.defs.resources import build_resources

    result = materialize(list(ASSETS), selection=SHARD_STEP, partition_key="faq",
                         instance=instance, resources=build_resources())
    mats = {e.asset_key.to_user_string(): e.step_materialization_data.materialization.metadata
            for e in result.get_asset_materialization_events()}
    for stage in ("instantiations", "judgements"):
        assert mats[stage]["engine_requests"].value == 0  # every generation served from the cache
        # the judge's requests include the control pairs' (judged in the same calls)
        controls = mats[stage]["control_pairs_judged"].value if stage == "judgements" else 0
        assert mats[stage]["cache_hits"].value == mats[stage]["total"].value + controls > controls
    for table, df in before.items():
        ids = [c for c in df.columns if c.endswith("_id") and c != "run_id" and not c.endswith("run_id")]
        assert store.read(table, "faq").select(ids).equals(df.select(ids)), table


def test_lineage_cli_json_has_the_documented_keys(pipeline, capsys):
    store, _, _ = pipeline
    pair_id = pl.read_parquet(store.glob("fineinstructions"))["pair_id"][0]
    assert cli(["--root", str(store.root), "lineage", "--json", pair_id]) == 0
    chain = json.loads(capsys.readouterr().out)
    assert list(chain) == ["pair", "judgement", "instantiation", "match", "template", "query", "document", "runs"]
    assert cli(["--root", str(store.root), "lineage", "p0000000000000000"]) == 2
    assert "not found" in capsys.readouterr().err


def test_lineage_job_shows_the_chain_with_links_to_runs_and_partitions(pipeline):
    from fineinstructions_dagster.defs.lineage.jobs import lineage_job as job
    from fineinstructions_dagster.defs.resources import build_resources

    store, instance, _ = pipeline
    pair = pl.read_parquet(store.glob("fineinstructions")).sort("pair_id").row(0, named=True)
    storage = {"storage": build_resources()["storage"]}  # built now: the fixture set FINEINSTRUCTIONS_ROOT
    result = job.execute_in_process(
        run_config={"ops": {"trace_pair_lineage": {"config": {"pair_id": pair["pair_id"]}}}}, instance=instance,
        resources=storage)
    assert result.success
    obs = [e.asset_observation_data.asset_observation for e in result.all_events if e.is_asset_observation]
    assert len(obs) == 1 and obs[0].partition == pair["shard"]
    md = obs[0].metadata["lineage"].value
    chain = trace_pair(store, pair["pair_id"])
    for step_id in (pair["pair_id"], pair["judgement_id"], pair["instantiation_id"], pair["match_id"],
                    pair["template_id"], pair["query_id"], pair["doc_id"]):
        assert f"`{step_id}`" in md
    for run_id in chain["runs"].values():
        assert f"(/runs/{run_id})" in md
    assert f"/assets/instantiations?view=partitions&partition={pair['shard']}" in md
    # The observation lands on the pair's partition, so the asset page shows it too.
    records = instance.fetch_observations(AssetKey("fineinstructions"), limit=10).records
    assert any(r.run_id == result.run_id for r in records)
    bad = job.execute_in_process(run_config={"ops": {"trace_pair_lineage": {"config": {"pair_id": "p404"}}}},
                                 instance=instance, resources=storage, raise_on_error=False)
    assert not bad.success
    failure = next(e for e in bad.all_events if e.is_step_failure)
    assert "pair 'p404' not found" in str(failure.step_failure_data.error.message)


def test_automation_on_real_runs_reruns_a_stale_shard_then_the_dbt_build_then_its_export(pipeline):
    from dagster import evaluate_automation_conditions

    from fineinstructions_dagster.definitions import ASSETS, defs
    from fineinstructions_dagster.defs.resources import build_resources
    from fineinstructions_dagster.runner import EXPORT_STEP, QUALITY_STEP

    _, instance, _ = pipeline
    assets, resources = list(ASSETS), build_resources()
    keys = set(defs.resolve_asset_graph().get_all_asset_keys())
    cursor = None

    def step(selection, partition=None):
        materialize(assets, selection=selection, partition_key=partition, instance=instance, resources=resources)

    def asked() -> dict[str, set[str]]:
        """One tick of the automation sensor over the instance the real runs wrote; then a second tick (those
        runs not done) must ask for nothing."""
        nonlocal cursor
        result = evaluate_automation_conditions(defs, instance, cursor=cursor)
        out = {k.to_user_string(): {p or "-" for p in result.get_requested_partitions(k)}
               for k in keys if result.get_num_requested(k)}
        out.pop("dataset_report", None)
        again = evaluate_automation_conditions(defs, instance, cursor=result.cursor)
        assert again.total_requested == 0
        cursor = again.cursor
        return out

    step(QUALITY_STEP)  # bring everything current (other tests re-ran a shard's pairs)
    for shard in ("faq", "tutorial"):
        step(EXPORT_STEP, shard)
    asked()  # the first tick: what the earlier tests' runs left due
    assert asked() == {}
    step(["documents"], "tutorial")
    # the rest of its chain (one run), and the dbt models over the chain's tables (they share its inputs)
    shard_models = {f"quality/{m}": {"-"} for m in ("documents", "matches", "instantiations", "judgements", "pairs")}
    assert asked() == {**{a: {"tutorial"} for a in SHARD_STEP[1:]}, **shard_models}
    step(SHARD_STEP[1:], "tutorial")
    due = asked()
    # once the chain is written, those models again, together
    assert due == shard_models
    step(QUALITY_STEP)
    # faq's pairs did not change: its export is not redone
    assert asked() == {"export_chat": {"tutorial"}, "export_packed": {"tutorial"}}
    step(EXPORT_STEP, "tutorial")
    assert asked() == {}


def test_a_run_over_several_partitions_materializes_each_once(pipeline):
    from dagster import DagsterEventType
    from dagster._core.storage.tags import ASSET_PARTITION_RANGE_END_TAG, ASSET_PARTITION_RANGE_START_TAG

    from fineinstructions_dagster.definitions import ASSETS
    from fineinstructions_dagster.defs.resources import build_resources

    store, instance, _ = pipeline
    result = materialize(list(ASSETS), selection=["documents"], instance=instance,
                         resources=build_resources(), tags={ASSET_PARTITION_RANGE_START_TAG: "faq",
                                                            ASSET_PARTITION_RANGE_END_TAG: "tutorial"})
    mats = {m.partition: m for m in (e.event_specific_data.materialization
                                     for e in result.get_asset_materialization_events())}
    assert sorted(mats) == ["faq", "tutorial"]
    for shard, mat in mats.items():  # each partition keeps its own counts, not the run's total
        assert mat.metadata["dagster/row_count"].value == store.read("documents", shard).height
        assert mat.metadata["partitions_in_run"].value == 2 and "preview" in mat.metadata
    checks = [e for e in result.all_events if e.event_type == DagsterEventType.ASSET_CHECK_EVALUATION]
    assert checks and all(c.event_specific_data.passed for c in checks)


def test_every_stage_check_ran_and_passed_on_the_demo_run(pipeline):
    from fineinstructions_dagster.definitions import defs

    _, instance, _ = pipeline
    keys = [k for k in defs.resolve_asset_graph().asset_check_keys if k.asset_key.path[0] != "quality"]
    assert len(keys) >= 11  # one or more per stage (the dbt tests are covered in test_quality.py)
    records = instance.event_log_storage.get_latest_asset_check_execution_by_key(keys)
    outcome = {k.to_user_string(): (r.event.asset_check_evaluation.passed if r and r.event
                                    and r.event.asset_check_evaluation else None) for k, r in
               ((k, records.get(k)) for k in keys)}
    assert all(v is True for v in outcome.values()), outcome


def test_every_shard_reports_its_control_pairs_in_metadata_and_the_report(pipeline):
    from dagster import AssetCheckKey

    store, instance, run = pipeline
    report = json.loads((store.root / "dataset_report" / "report.json").read_text())
    for shard in run.shards:
        records = instance.fetch_materializations(AssetKey("fineinstructions"), limit=50).records
        md = next(r.asset_materialization.metadata for r in records if r.asset_materialization.partition == shard)
        outcomes = store.read("control_outcomes", shard).filter(pl.col("judged"))
        assert outcomes.height >= 1 and set(outcomes["control_kind"]) == {"swapped", "near_miss"}
        assert md["controls"].value == outcomes.height
        assert md["controls_kept"].value == int(outcomes["kept"].sum())
        for key in ("controls_kept_share", "swapped_kept_share", "near_miss_kept_share", "swapped_judge_score_auc",
                    "swapped_relevance_auc", "swapped_grounding_auc", "true_kept_share", "pairs_kept_share"):
            assert key in md, key
        figures = report["controls"]["shards"][shard]
        assert figures["controls"] == outcomes.height and figures["swapped"]["controls"] >= 1
        assert 0.0 <= figures["swapped"]["judge_score_auc"] <= 1.0
    assert report["controls"]["all"]["controls"] == sum(
        report["controls"]["shards"][s]["controls"] for s in run.shards)
    record = instance.get_latest_asset_check_evaluation_record(
        AssetCheckKey(AssetKey("fineinstructions"), "gates_reject_control_pairs"))
    evaluation = record.event.asset_check_evaluation
    # the smoke profile's gates are relaxed on purpose: every control gets through, and the check says so
    assert evaluation.passed and "warning only" in (evaluation.description or "")


def test_control_pairs_never_reach_the_pairs_the_exports_or_the_counts(pipeline):
    store, _, run = pipeline
    pairs = pl.read_parquet(store.glob("fineinstructions"))
    controls = pl.read_parquet(store.glob("control_judgements"))
    assert controls.height > 0
    assert not set(controls["judgement_id"].drop_nulls()) & set(pairs["judgement_id"])
    assert not set(controls["control_id"]) & set(pl.read_parquet(store.glob("judgements"))["instantiation_id"])
    chat = pl.read_parquet(store.glob("export_chat"))
    assert sorted(chat["pair_id"]) == sorted(pairs["pair_id"])
    exported = {m[1]["content"] for m in chat["messages"].to_list()}
    kept_controls = pl.read_parquet(store.glob("control_outcomes")).filter(pl.col("kept"))
    assert kept_controls.height > 0  # the smoke gates keep them, and still none is exported
    answers = set(controls.filter(pl.col("control_id").is_in(kept_controls["control_id"].implode()))["answer"])
    own = set(pairs["answer"])
    assert not (answers - own) & exported  # an answer only a control carries is never exported
    report = json.loads((store.root / "dataset_report" / "report.json").read_text())
    assert report["pairs"] == pairs.height


def test_a_gate_that_accepts_everything_fails_the_control_check_and_blocks_the_export(pipeline):
    from dagster import DagsterEventType

    from fineinstructions_dagster.definitions import ASSETS
    from fineinstructions_dagster.defs.resources import PipelineResource, build_resources

    store, instance, _ = pipeline
    assets = list(ASSETS)
    # the thresholds set to accept everything, under a profile whose control check blocks
    broken = {**build_resources(), "pipeline": PipelineResource(judge_threshold=1, min_grounding=0.0,
                                                                min_relevance=-1.0, control_check_blocks=True)}
    exported_before = store.read("export_chat", "faq")
    result = materialize(assets, selection=["fineinstructions", "control_outcomes", "export_chat", "export_packed"],
                         partition_key="faq", instance=instance, resources=broken, raise_on_error=False)
    checks = {e.event_specific_data.check_name: e.event_specific_data for e in result.all_events
              if e.event_type == DagsterEventType.ASSET_CHECK_EVALUATION}
    check = checks["gates_reject_control_pairs"]
    assert not check.passed and "shard faq" in check.description and "not filtering" in check.description
    materialized = {e.asset_key.to_user_string() for e in result.get_asset_materialization_events()}
    assert "fineinstructions" in materialized and "export_chat" not in materialized  # blocked in the same run
    # launched by itself (a backfill, by hand), the export refuses too, naming the shard's control check
    alone = materialize(assets, selection=["export_chat", "export_packed"], partition_key="faq", instance=instance,
                        resources=broken, raise_on_error=False)
    assert not alone.success
    failure = next(e for e in alone.all_events if e.is_step_failure)
    assert "kept" in failure.step_failure_data.error.message and "control pairs" in \
        failure.step_failure_data.error.message
    assert store.read("export_chat", "faq").equals(exported_before)  # nothing was written
    # back to the profile's gates (later tests read this shard)
    assert materialize(assets, selection=["fineinstructions", "control_outcomes"], partition_key="faq",
                       instance=instance, resources=build_resources()).success


def test_a_changed_stage_code_makes_that_asset_stale_in_dagster(pipeline):
    """Dagster's own staleness (what the UI shows): with the code version of `instantiations` changed, it and only it
    becomes stale, by its code ("has a new code version"); what follows becomes stale when it is re-materialized
    with a new data version (Dagster propagates staleness through data versions, not projections)."""
    from dagster import AssetsDefinition
    from dagster._core.definitions.assets.graph.asset_graph import AssetGraph
    from dagster._core.definitions.data_version import StaleCauseCategory
    from dagster._utils.test.data_versions import get_stale_status_resolver  # what the webserver's resolver reads

    from fineinstructions_dagster.definitions import ASSETS

    _, instance, run = pipeline
    shard, changed = run.shards[0], AssetKey("instantiations")

    def partition(graph: AssetGraph, key: AssetKey) -> str | None:
        return shard if graph.get(key).partitions_def == graph.get(changed).partitions_def else None

    def stale_by_code(assets: list[AssetsDefinition]) -> set[str]:  # other causes (earlier tests' runs) aside
        graph, resolver = AssetGraph.from_assets(assets), get_stale_status_resolver(instance, assets)
        return {n.key.to_user_string() for n in graph.asset_nodes if n.is_materializable and any(
            c.category == StaleCauseCategory.CODE for c in resolver.get_stale_causes(n.key, partition(graph, n.key)))}

    bumped = [a.map_asset_specs(lambda s: s.replace_attributes(code_version="changed") if s.key == changed else s)
              if changed in a.keys else a for a in ASSETS]
    assert stale_by_code(ASSETS) == set()
    assert stale_by_code(bumped) == {"instantiations"}
    causes = get_stale_status_resolver(instance, bumped).get_stale_root_causes(changed, shard)
    assert StaleCauseCategory.CODE in {c.category for c in causes}


def test_a_replaced_input_file_makes_its_own_shard_due_and_a_dedup_run_leaves_the_others_fresh(pipeline):
    """What the scheduled backfill asks Dagster's staleness (the UI's), on the real runs' data versions: a shard
    file replaced in place (its observation has a new version) makes that shard's filter, the dedup step, its own
    chain and export, the dbt models and the report due, and not one partition of another shard. Then a dedup
    run that leaves every removal list as it was makes no shard's `documents` stale in the UI (its GraphQL)."""
    from dagster import AssetObservation

    from fineinstructions_dagster.definitions import ASSETS, defs
    from fineinstructions_dagster.defs.observations import CORPUS_FILES, find_inputs, observe_inputs, observed_versions
    from fineinstructions_dagster.defs.partitions import EVERY_BUCKET_RANGE
    from fineinstructions_dagster.defs.resources import InputsResource, build_resources
    from fineinstructions_dagster.defs.staleness import due_asset_partitions
    from fineinstructions_dagster.runner import DEDUP_STEP
    from tests.ui_staleness import ui_stale

    _, instance, run = pipeline
    graph = defs.resolve_asset_graph()
    shard, others = run.shards[0], set(run.shards[1:])
    assert others and set(observed_versions(instance, CORPUS_FILES)) == set(run.shards)  # the runner observed them
    before = due_asset_partitions(instance, graph)  # (earlier tests in this module may have left some)
    instance.report_runless_asset_event(AssetObservation(
        AssetKey(CORPUS_FILES), partition=shard, tags={"dagster/data_version": "replaced in place"}))
    after = due_asset_partitions(instance, graph)
    due = {(ap.asset_key.to_user_string(), ap.partition_key) for ap in after}
    new = {(ap.asset_key.to_user_string(), ap.partition_key) for ap in after - before}
    per_shard = ["filtered_documents", "document_signatures", "document_bands", *SHARD_STEP, "export_chat",
                 "export_packed"]
    assert {(a, shard) for a in per_shard} <= due
    assert {("document_clusters", None), ("dataset_report", None), ("quality/pairs", None)} <= due
    assert not {(a, p) for a, p in new if p in others}, "another shard's partition became due"
    # the file back as it is: the runner's observation finds it changed again, and nothing is due for it
    assert observe_inputs(instance, find_inputs(InputsResource()))[CORPUS_FILES] == [shard]
    assert due_asset_partitions(instance, graph) == before

    assert materialize(ASSETS, selection=DEDUP_STEP, instance=instance, resources=build_resources(),
                       tags=EVERY_BUCKET_RANGE).success  # the same shards again: no removal list changes
    stale = ui_stale(instance)  # what the UI shows (earlier tests in this module may have left other causes)
    for s in run.shards:
        causes = stale.get(("documents", s), [])
        assert not any("document_clusters" in c or "removal_lists" in c for c in causes), (s, causes)


def test_a_changed_threshold_makes_exactly_its_stage_stale_in_the_ui_and_the_runner_reruns_only_that(pipeline):
    """The UI's stale status (GraphQL) and `fineinstructions run` give one answer. After a run, nothing is stale. A
    changed judge threshold, once observed, makes exactly the pairs step's assets stale in every shard (through
    `gate_settings`); the runner re-runs those (and the dbt build, the exports and the report after them) and
    reports every other step up to date, after which the UI marks nothing stale again. (Last in the module: it
    leaves the fixture's pairs under another threshold.)"""
    from dagster import AssetRecordsFilter

    from fineinstructions_dagster.defs.resources import PipelineResource, build_resources
    from fineinstructions_dagster.defs.settings import GATE_SETTINGS, observe_settings
    from fineinstructions_dagster.runner import run_pipeline
    from tests.ui_staleness import ui_stale

    _, instance, run = pipeline
    settled = run_pipeline(instance, log=lambda _: None)  # whatever earlier tests in this module left due
    assert settled.ok and ui_stale(instance) == {}

    def made(asset: str, shard: str) -> int:
        return len(instance.fetch_materializations(
            AssetRecordsFilter(asset_key=AssetKey(asset), asset_partitions=[shard]), limit=100).records)

    counts = {(a, s): made(a, s) for a in SHARD_STEP for s in run.shards}
    overrides = {"judge_threshold": 2}  # the smoke profile's is 1
    assert observe_settings(instance, {**build_resources(), "pipeline": PipelineResource(**overrides)}) == [
        GATE_SETTINGS.key]
    stale = ui_stale(instance)
    assert set(stale) == {(a, s) for a in ("fineinstructions", "control_outcomes") for s in run.shards}
    assert all(any(GATE_SETTINGS.key in c for c in causes) for causes in stale.values()), stale

    lines: list[str] = []
    again = run_pipeline(instance, log=lines.append, pipeline_overrides=overrides)
    assert again.ok, [f.describe() for f in again.failures]
    assert {"benchmarks", *(f"queries [{s}]" for s in run.sources), "template_index",
            *(f"filter [{s}]" for s in run.shards), "dedup"} == set(again.current), again.current
    for shard in run.shards:
        assert any(line.startswith(f"-> shard [{shard}]: fineinstructions, control_outcomes;") for line in lines), lines
    assert {(a, s): made(a, s) for a in SHARD_STEP for s in run.shards} == {
        k: n + (k[0] in ("fineinstructions", "control_outcomes")) for k, n in counts.items()}
    assert ui_stale(instance) == {}
