"""The code location loads, with every asset of the design, its jobs, sensors and pools."""

from dagster import DagsterInstance, build_sensor_context

from fineinstructions_dagster.definitions import defs
from fineinstructions_dagster.defs.documents.sensors import corpus_shard_sensor
from fineinstructions_dagster.defs.resources import InputsResource

ASSETS = {"user_queries", "templates", "template_bank", "template_index", "filtered_documents",
          "document_clusters", "documents", "matches", "instantiations", "judgements", "fineinstructions",
          "pretraining_export", "dataset_report"}


def test_every_asset_is_defined_with_its_partitions_and_pool():
    graph = defs.resolve_asset_graph()
    keys = {k.to_user_string() for k in graph.get_all_asset_keys()}
    assert keys == ASSETS
    specs = {s.key.to_user_string(): s for s in defs.resolve_all_asset_specs()}
    assert {k for k, s in specs.items() if s.partitions_def is not None} == {
        "user_queries", "templates", "filtered_documents", "documents", "matches", "instantiations", "judgements",
        "fineinstructions", "pretraining_export"}
    pooled = {k for k in ASSETS if defs.resolve_assets_def(k).op.pool == "gpu"}
    assert pooled == {"templates", "instantiations", "judgements"}
    assert all(s.description for s in specs.values())


def test_jobs_and_sensors_load():
    for job in ("queries_job", "template_index_job", "filter_job", "dedup_job", "shard_job", "report_job"):
        assert defs.resolve_job_def(job)
    assert {s.name for s in defs.sensors} == {"corpus_shard_sensor", "query_source_sensor"}


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
