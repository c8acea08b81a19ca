"""The declarative automation of the code location, evaluated by Dagster's own evaluator over an instance whose
history is written as the runs would write it: what a new shard, a re-filtered shard, a new template index and
a dbt build make due, and that nothing is requested twice."""

from __future__ import annotations

import pytest
from dagster import (
    AssetCheckEvaluation,
    AssetCheckKey,
    AssetKey,
    AssetMaterialization,
    AssetObservation,
    AssetSelection,
    DagsterInstance,
    evaluate_automation_conditions,
)

from fineinstructions_dagster.definitions import defs
from fineinstructions_dagster.defs.pairs.assets import CONTROLS_REJECTED
from fineinstructions_dagster.defs.quality.assets import QUALITY_CHECK_KEYS, dbt_quality
from fineinstructions_dagster.defs.settings import EXPORT_SETTINGS, GATE_SETTINGS, STAGES
from fineinstructions_dagster.defs.steps import SHARD_STEP
from fineinstructions_dagster.stages.dedup import bucket_range_keys

CHAIN = SHARD_STEP  # documents .. fineinstructions, with the control-pair tables written beside them
FILTER = ["filtered_documents", "document_signatures", "document_bands"]
EXPORT = ["export_chat", "export_packed"]  # one step, pretraining_export
QUALITY = sorted(k.to_user_string() for k in dbt_quality.keys)
ASSET_KEYS = set(defs.resolve_asset_graph().get_all_asset_keys())


def _mat(instance: DagsterInstance, asset: str, partition: str | None = None) -> None:
    instance.report_runless_asset_event(AssetMaterialization(AssetKey(asset.split("/")), partition=partition))


def _dedup(instance: DagsterInstance, shards: list[str], version: str = "1") -> None:
    """A document_clusters run, as it records it: the removal lists it changed (observed), then the asset."""
    for shard in shards:
        instance.report_runless_asset_event(AssetObservation(
            AssetKey("removal_lists"), partition=shard, tags={"dagster/data_version": f"{shard}-{version}"}))
    _mat(instance, "document_clusters")


def _settings(instance: DagsterInstance, key: str, version: str) -> None:
    instance.report_runless_asset_event(AssetObservation(AssetKey(key), tags={"dagster/data_version": version}))


def _dbt_build(instance: DagsterInstance, passed: bool = True) -> None:
    for key in QUALITY:
        _mat(instance, key)
    for check in QUALITY_CHECK_KEYS:
        instance.report_runless_asset_event(AssetCheckEvaluation(
            asset_key=check.asset_key, check_name=check.name, passed=passed or "unique" not in check.name))


def _shard(instance: DagsterInstance, shard: str, steps: list[str]) -> None:
    for asset in steps:
        _mat(instance, asset, shard)
        if asset == "fineinstructions":  # its blocking control check, evaluated as the pairs are written
            instance.report_runless_asset_event(AssetCheckEvaluation(
                asset_key=AssetKey(asset), check_name=CONTROLS_REJECTED, passed=True))


def requested(result) -> dict[str, set[str]]:  # noqa: ANN001 - EvaluateAutomationConditionsResult
    """asset -> requested partitions ("-" for an unpartitioned asset). A dbt model must come with its tests."""
    out = {}
    for r in result.results:
        if r.key in ASSET_KEYS and result.get_num_requested(r.key):
            out[r.key.to_user_string()] = {p or "-" for p in result.get_requested_partitions(r.key)}
    checks = {r.key for r in result.results if isinstance(r.key, AssetCheckKey) and r.true_subset.size}
    for check in QUALITY_CHECK_KEYS:  # (here the events are written without runs, so a check may come again)
        assert check in checks or check.asset_key.to_user_string() not in out, check
    return out


@pytest.fixture
def built():
    """Two shards and one query source, every step materialized once, the dbt tests passed; the evaluator's
    first tick (which requests nothing) done."""
    with DagsterInstance.ephemeral() as instance:
        instance.add_dynamic_partitions("corpus_shard", ["faq", "tutorial"])
        instance.add_dynamic_partitions("query_source", ["python_faq"])
        for stage in STAGES:  # the sensors' first tick observes every stage's settings
            _settings(instance, stage.key, "1")
        _mat(instance, "benchmark_ngrams")  # benchmark_sensor's, before the input sensors add anything
        for asset in ("user_queries", "templates"):
            _mat(instance, asset, "python_faq")
        _mat(instance, "template_bank")
        _mat(instance, "template_index")
        for shard in ("faq", "tutorial"):
            _shard(instance, shard, FILTER)
        for r in bucket_range_keys():
            _mat(instance, "duplicate_edges", r)
        _dedup(instance, ["faq", "tutorial"])
        for shard in ("faq", "tutorial"):
            _shard(instance, shard, CHAIN)
        _dbt_build(instance)
        for shard in ("faq", "tutorial"):
            _shard(instance, shard, EXPORT)
        _mat(instance, "dataset_report")
        first = evaluate_automation_conditions(defs, instance)
        assert requested(first) == {}, requested(first)
        yield instance, first.cursor


def test_a_new_shard_runs_dedup_its_own_chain_quality_and_its_export_each_once(built):
    instance, cursor = built

    def tick(expected: dict[str, set[str]]) -> None:
        nonlocal cursor
        result = evaluate_automation_conditions(defs, instance, cursor=cursor)
        got = requested(result)
        got.pop("dataset_report", None)  # a summary of everything: re-made whenever a table changed
        assert got == expected
        cursor = result.cursor
        again = evaluate_automation_conditions(defs, instance, cursor=cursor)  # those runs not done yet:
        assert requested(again) == {}  # nothing is asked twice
        cursor = again.cursor

    instance.add_dynamic_partitions("corpus_shard", ["howto"])
    _shard(instance, "howto", FILTER)  # what corpus_shard_sensor's run writes
    tick({"duplicate_edges": set(bucket_range_keys()), "document_clusters": {"-"}})
    for r in bucket_range_keys():
        _mat(instance, "duplicate_edges", r)
    _dedup(instance, ["howto"])
    # the new shard's chain, as one run; not faq's or tutorial's: their removal lists stay as they were
    tick({asset: {"howto"} for asset in CHAIN})
    _shard(instance, "howto", CHAIN)
    # the dbt models over the shards' tables (not those over the queries and the bank), before any export
    tick({f"quality/{m}": {"-"} for m in ("documents", "matches", "instantiations", "judgements", "pairs")})
    _dbt_build(instance)
    tick({asset: {"howto"} for asset in EXPORT})  # the dbt tests passed on the new pairs
    _shard(instance, "howto", EXPORT)
    tick({})


def test_a_refiltered_shard_waits_for_dedup_then_reruns_its_chain(built):
    instance, cursor = built
    _shard(instance, "faq", FILTER)
    # Dedup cannot start while another shard's filter runs: nothing of faq's chain runs before its decisions.
    result = evaluate_automation_conditions(defs, instance, cursor=cursor,
                                            asset_selection=AssetSelection.assets(*CHAIN))
    assert requested(result) == {}
    _mat(instance, "document_clusters")  # the dedup run, decided after the new filter output
    result = evaluate_automation_conditions(defs, instance, cursor=result.cursor)
    got = requested(result)
    assert {a: got.get(a) for a in CHAIN} == {a: {"faq"} for a in CHAIN}
    # Another dedup run (e.g. for a new shard) does not run faq's chain again.
    _shard(instance, "faq", CHAIN)
    _mat(instance, "document_clusters")
    result = evaluate_automation_conditions(defs, instance, cursor=result.cursor)
    assert "documents" not in requested(result)
    # One that changed tutorial's removal list (the `rebuild` rule can) runs tutorial's chain, not faq's.
    _dedup(instance, ["tutorial"], version="2")
    result = evaluate_automation_conditions(defs, instance, cursor=result.cursor)
    assert requested(result).get("documents") == {"tutorial"}


def test_a_new_template_index_reruns_matching_for_every_shard(built):
    instance, cursor = built
    _mat(instance, "template_bank")
    result = evaluate_automation_conditions(defs, instance, cursor=cursor)
    got = requested(result)
    assert got["template_index"] == {"-"}
    for asset in CHAIN[1:]:
        assert got[asset] == {"faq", "tutorial"}, asset
    assert "documents" not in got


def test_a_changed_threshold_reruns_the_pairs_step_of_every_shard_then_the_dbt_build_then_the_exports(built):
    instance, cursor = built

    def tick() -> dict[str, set[str]]:
        nonlocal cursor
        result = evaluate_automation_conditions(defs, instance, cursor=cursor)
        cursor = result.cursor
        got = requested(result)
        got.pop("dataset_report", None)
        return got

    _settings(instance, GATE_SETTINGS.key, "2")  # a sensor observed a new judge threshold
    assert tick() == {a: {"faq", "tutorial"} for a in ("fineinstructions", "control_outcomes")}
    for shard in ("faq", "tutorial"):
        _shard(instance, shard, ["fineinstructions", "control_outcomes"])
    # the dbt models over the shards' tables, together (their tests join the chain's tables)
    assert tick() == {f"quality/{m}": {"-"} for m in ("documents", "matches", "instantiations", "judgements", "pairs")}
    _dbt_build(instance)
    assert tick() == {a: {"faq", "tutorial"} for a in EXPORT}
    for shard in ("faq", "tutorial"):
        _shard(instance, shard, EXPORT)
    assert tick() == {}
    _settings(instance, EXPORT_SETTINGS.key, "2")  # another sequence length: the exports alone, as the pairs are
    assert tick() == {a: {"faq", "tutorial"} for a in EXPORT}


def test_the_export_waits_for_dbt_tests_that_pass(built):
    instance, cursor = built
    export = AssetSelection.assets(*EXPORT)
    _shard(instance, "faq", ["fineinstructions"])
    result = evaluate_automation_conditions(defs, instance, cursor=cursor, asset_selection=export)
    assert requested(result) == {}  # new pairs, but no dbt build since
    _mat(instance, "quality/documents")  # a model over another table was rebuilt: the pairs' tests were not run
    result = evaluate_automation_conditions(defs, instance, cursor=result.cursor, asset_selection=export)
    assert requested(result) == {}
    _dbt_build(instance, passed=False)  # the build after the new pairs: a uniqueness test fails
    result = evaluate_automation_conditions(defs, instance, cursor=result.cursor, asset_selection=export)
    assert requested(result) == {}
    again = evaluate_automation_conditions(defs, instance, cursor=result.cursor, asset_selection=export)
    assert requested(again) == {}  # still failing: still waiting
    _dbt_build(instance, passed=True)  # the data was fixed and the build ran again
    result = evaluate_automation_conditions(defs, instance, cursor=again.cursor, asset_selection=export)
    assert requested(result) == {asset: {"faq"} for asset in EXPORT}
    # A dbt build alone (no new pairs) exports nothing again.
    _dbt_build(instance, passed=True)
    result = evaluate_automation_conditions(defs, instance, cursor=result.cursor, asset_selection=export)
    assert requested(result) == {}


def test_every_dbt_test_is_a_blocking_check_upstream_of_the_export():
    specs = list(dbt_quality.check_specs)
    assert specs and all(s.blocking for s in specs)
    for asset in EXPORT:
        deps = {d.asset_key for d in defs.resolve_assets_def(asset).specs_by_key[AssetKey(asset)].deps}
        assert set(dbt_quality.keys) <= deps


def test_nothing_runs_by_itself_before_the_sensors_first_steps():
    with DagsterInstance.ephemeral() as instance:
        first = evaluate_automation_conditions(defs, instance)
        assert requested(first) == {}
        instance.add_dynamic_partitions("corpus_shard", ["faq"])  # the sensor's partition, its run not yet done
        instance.add_dynamic_partitions("query_source", ["python_faq"])
        assert requested(evaluate_automation_conditions(defs, instance, cursor=first.cursor)) == {}


def test_a_replaced_input_file_reruns_its_own_first_steps_only(built):
    instance, cursor = built

    def observe(asset: str, partition: str, version: str) -> None:
        instance.report_runless_asset_event(AssetObservation(
            AssetKey(asset), partition=partition, tags={"dagster/data_version": version}))

    observe("corpus_files", "faq", "v2")  # what corpus_shard_sensor records when faq's file was replaced in place
    result = evaluate_automation_conditions(defs, instance, cursor=cursor)
    assert requested(result) == {asset: {"faq"} for asset in FILTER}
    again = evaluate_automation_conditions(defs, instance, cursor=result.cursor)
    assert requested(again) == {}
    observe("query_files", "python_faq", "v2")
    result = evaluate_automation_conditions(defs, instance, cursor=again.cursor)
    assert requested(result) == {"user_queries": {"python_faq"}, "templates": {"python_faq"}}  # one run
    _mat(instance, "user_queries", "python_faq")
    _mat(instance, "templates", "python_faq")
    result = evaluate_automation_conditions(defs, instance, cursor=result.cursor,
                                            asset_selection=AssetSelection.assets("user_queries", "templates"))
    assert requested(result) == {}


def test_a_new_benchmark_file_reruns_exactly_the_decontaminating_steps_and_what_follows(built):
    instance, cursor = built
    # what benchmark_sensor does when a benchmark file was added: the settings' new version, then the n-grams
    _settings(instance, "decontamination_settings", "2")
    _mat(instance, "benchmark_ngrams")
    result = evaluate_automation_conditions(defs, instance, cursor=cursor)
    # the steps that read benchmark_ngrams, and nothing else yet: no matching, generation, judging, dbt or export
    # (a shard whose filter removes a document runs its chain after dedup, as for a re-filtered shard)
    assert requested(result) == {"user_queries": {"python_faq"}, "templates": {"python_faq"},
                                 **{a: {"faq", "tutorial"} for a in [*FILTER, "fineinstructions", "control_outcomes"]}}
    again = evaluate_automation_conditions(defs, instance, cursor=result.cursor)
    assert requested(again) == {}
