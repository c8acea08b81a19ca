"""The code location loads, with every asset of the design, its jobs, sensors and pools."""

from dagster import AssetCheckResult, DagsterInstance, MaterializeResult, build_sensor_context

from fineinstructions_dagster.definitions import defs
from fineinstructions_dagster.defs.documents.sensors import corpus_shard_sensor
from fineinstructions_dagster.defs.metadata import for_each_partition
from fineinstructions_dagster.defs.partitions import (
    PARTITIONS_PER_RUN,
    exports_to_refresh,
    shards_to_refresh,
    shared_steps_to_refresh,
)
from fineinstructions_dagster.defs.resources import InputsResource

ASSETS = {"user_queries", "templates", "template_bank", "template_index", "filtered_documents",
          "document_signatures", "document_bands", "duplicate_edges", "document_clusters", "documents", "matches",
          "instantiations", "judgements", "fineinstructions",
          "pretraining_export", "dataset_report"} | {
    f"quality/{m}" for m in ("pairs", "templates", "documents", "matches", "queries", "instantiations", "judgements")}


def test_every_asset_is_defined_with_its_partitions_and_pool():
    graph = defs.resolve_asset_graph()
    keys = {k.to_user_string() for k in graph.get_all_asset_keys()}
    assert keys == ASSETS
    specs = {s.key.to_user_string(): s for s in defs.resolve_all_asset_specs()}
    assert {k for k, s in specs.items() if s.partitions_def is not None} == {
        "user_queries", "templates", "filtered_documents", "document_signatures", "document_bands",
        "duplicate_edges", "documents", "matches", "instantiations", "judgements",
        "fineinstructions", "pretraining_export"}
    pooled = {k for k in ASSETS if "/" not in k and defs.resolve_assets_def(k).op.pool == "gpu"}
    assert pooled == {"templates", "instantiations", "judgements"}
    assert all(s.description for s in specs.values())


def test_jobs_schedules_and_sensors_load():
    for job in ("queries_job", "template_index_job", "filter_job", "dedup_job", "shard_job", "report_job",
                "lineage_job"):
        assert defs.resolve_job_def(job)
    assert {s.name for s in defs.sensors} == {"corpus_shard_sensor", "query_source_sensor", "dedup_sensor",
                                              "automation_sensor"}
    # every job a schedule or sensor targets resolves, as the code server loads them
    defs.get_repository_def().load_all_definitions()
    assert [s.name for s in defs.schedules] == ["missing_or_stale_shards"]


def test_llm_assets_batch_partitions_per_backfill_run_and_summaries_automate():
    for key in ("templates", "instantiations", "judgements", "matches", "documents", "fineinstructions"):
        policy = defs.resolve_assets_def(key).backfill_policy
        assert policy is not None and policy.max_partitions_per_run == PARTITIONS_PER_RUN > 1, key
    for key in ("template_bank", "template_index", "document_clusters", "dataset_report"):
        assert defs.resolve_assets_def(key).automation_conditions_by_key, key


def test_shards_to_refresh_names_the_first_missing_or_stale_step():
    chain = ["filtered", "documents", "matches"]
    latest = {"filtered": {"a": 1, "b": 1, "c": 1, "d": 1}, "documents": {"a": 2, "b": 2, "c": 5, "d": 2},
              "matches": {"a": 7, "c": 4, "d": 3}}
    todo = shards_to_refresh(["a", "b", "c", "d", "new"], latest, {"index": 6}, chain, {"matches": ["index"]})
    assert todo == {"b": ("matches missing", 6), "c": ("matches older than its inputs", 6),
                    "d": ("matches older than its inputs", 6)}  # d: the index (6) is newer than its matches (3)
    assert shards_to_refresh(["a"], latest, {"index": 6}, chain, {"matches": ["index"]}) == {}


def test_new_dedup_decisions_make_stale_only_the_shards_whose_removal_list_changed():
    chain = ["filtered", "documents"]
    latest = {"filtered": {"old": 1, "new": 8}, "documents": {"old": 3}}
    # document_clusters last materialized at 9 (the new shard's decisions); the old shard's list last changed at 2
    todo = shards_to_refresh(["old", "new"], latest, {"clusters": 9}, chain, {"documents": ["clusters"]},
                             {"clusters": {"old": 2, "new": 9}})
    assert todo == {"new": ("documents missing", 9)}
    # without the per-shard ids every shard would be redone
    assert set(shards_to_refresh(["old", "new"], latest, {"clusters": 9}, chain, {"documents": ["clusters"]})) == {
        "old", "new"}


def test_a_run_over_several_partitions_keeps_each_partitions_metadata_and_names_failed_checks():
    class Context:  # the two things for_each_partition uses of an AssetExecutionContext
        def __init__(self, keys):
            self.partition_keys, self.added = keys, {}

        def add_asset_metadata(self, metadata, partition_key=None):
            self.added[partition_key] = metadata

    def one(key: str) -> MaterializeResult:
        return MaterializeResult(metadata={"dagster/row_count": {"a": 2, "b": 3}[key]},
                                 check_results=[AssetCheckResult(check_name="ok", passed=key == "a")])

    single = for_each_partition(Context(["a"]), one)
    assert single.metadata["dagster/row_count"] == 2
    ctx = Context(["a", "b"])
    both = for_each_partition(ctx, one)
    assert ctx.added == {"a": {"dagster/row_count": 2}, "b": {"dagster/row_count": 3}}
    assert both.metadata == {"partitions_in_run": 2}
    (check,) = both.check_results
    assert not check.passed and check.metadata["failed_partitions"].value == "b"


def test_shared_steps_and_the_dbt_build_come_before_what_depends_on_them():
    # A new shard filtered after the clusters: dedup first (the chain would fail without a decision).
    assert shared_steps_to_refresh({"a": 5, "new": 9}, clusters=7, bank=3, index=4) == ["document_clusters"]
    assert shared_steps_to_refresh({"a": 5}, clusters=7, bank=8, index=4) == ["template_index"]
    assert shared_steps_to_refresh({"a": 5}, clusters=7, bank=3, index=4) == []
    # An export older than its pairs waits for a dbt build newer than those pairs and than the bank/queries.
    assert exports_to_refresh(["a", "b"], {"a": 10, "b": 12}, {"a": 15}, quality=14) == (False, ["b"])
    assert exports_to_refresh(["a", "b"], {"a": 10, "b": 20}, {"a": 15}, quality=14) == (True, [])
    assert exports_to_refresh(["a", "b"], {"a": 10, "b": 12}, {"a": 15}, quality=14, other_inputs=16) == (True, [])
    assert exports_to_refresh(["a"], {"a": 10}, {"a": 15}, quality=14, other_inputs=16) == (False, [])


def test_shard_sensor_adds_one_partition_per_new_file(tmp_path):
    (tmp_path / "shard-a.parquet").write_bytes(b"")
    (tmp_path / "shard-b.jsonl").write_text("")
    with DagsterInstance.ephemeral() as instance:
        ctx = build_sensor_context(instance=instance, resources={"inputs": InputsResource(
            queries_dir=str(tmp_path), corpus_dir=str(tmp_path))})
        result = corpus_shard_sensor(ctx)
        assert [r.partition_key for r in result.run_requests] == ["shard-a", "shard-b"]
        assert list(result.dynamic_partitions_requests[0].partition_keys) == ["shard-a", "shard-b"]
        instance.add_dynamic_partitions("corpus_shard", ["shard-a", "shard-b"])
        again = corpus_shard_sensor(build_sensor_context(instance=instance, resources={"inputs": InputsResource(
            queries_dir=str(tmp_path), corpus_dir=str(tmp_path))}))
        assert "no new corpus_shard" in again.skip_message
