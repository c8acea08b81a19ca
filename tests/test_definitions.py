"""The code location loads, with every asset of the design, its jobs, sensors and pools."""

from dagster import AssetCheckResult, DagsterInstance, DefaultSensorStatus, MaterializeResult, build_sensor_context

from fineinstructions_dagster.definitions import defs
from fineinstructions_dagster.defs.documents.sensors import corpus_shard_sensor
from fineinstructions_dagster.defs.metadata import for_each_partition
from fineinstructions_dagster.defs.observations import CORPUS_FILES, observed_versions
from fineinstructions_dagster.defs.partitions import PARTITIONS_PER_RUN
from fineinstructions_dagster.defs.resources import InputsResource, build_resources
from fineinstructions_dagster.defs.settings import STAGES

ASSETS = {"benchmark_ngrams", "user_queries", "templates", "template_bank", "template_index", "filtered_documents",
          "document_signatures", "document_bands", "duplicate_edges", "document_clusters", "documents", "matches",
          "instantiations", "judgements", "control_judgements", "fineinstructions", "control_outcomes",
          "export_chat", "export_packed", "dataset_report"} | {
    f"quality/{m}" for m in ("pairs", "templates", "documents", "matches", "queries", "instantiations", "judgements")}
# observed, never materialized: the input files and each shard's dedup removal list (partitioned), each stage's
# settings (not)
SOURCES = {"query_files", "corpus_files", "removal_lists"}
SETTINGS = {"decontamination_settings", "query_filter_settings", "genericizer_settings", "template_index_settings",
            "document_filter_settings",
            "dedup_settings", "matching_settings", "instantiation_settings", "judging_settings", "gate_settings",
            "export_settings"}


def test_every_asset_is_defined_with_its_partitions_and_pool():
    graph = defs.resolve_asset_graph()
    keys = {k.to_user_string() for k in graph.get_all_asset_keys()}
    assert keys == ASSETS | SOURCES | SETTINGS
    assert {s.key for s in STAGES} == SETTINGS
    assert {k.to_user_string() for k in graph.materializable_asset_keys} == ASSETS
    specs = {s.key.to_user_string(): s for s in defs.resolve_all_asset_specs()}
    assert {k for k, s in specs.items() if s.partitions_def is not None} == {
        "user_queries", "templates", "filtered_documents", "document_signatures", "document_bands",
        "duplicate_edges", "documents", "matches", "instantiations", "judgements", "control_judgements",
        "fineinstructions", "control_outcomes", "export_chat", "export_packed"} | SOURCES
    pooled = {k for k in ASSETS if "/" not in k and defs.resolve_assets_def(k).op.pool == "gpu"}
    assert pooled == {"templates", "instantiations", "judgements", "control_judgements"}
    assert all(s.description for s in specs.values())


def test_new_inputs_wait_for_benchmark_ngrams_which_its_sensor_requests_once_per_benchmarks_version(tmp_path):
    from dagster import materialize

    from fineinstructions_dagster.defs.decontamination.assets import benchmark_ngrams
    from fineinstructions_dagster.defs.decontamination.sensors import benchmark_sensor
    from fineinstructions_dagster.defs.resources import StorageResource

    (tmp_path / "corpus").mkdir()
    (tmp_path / "corpus" / "shard-a.jsonl").write_text("")
    resources = {**build_resources(), "storage": StorageResource(root=str(tmp_path / "root")),
                 "inputs": InputsResource(queries_dir=str(tmp_path), corpus_dir=str(tmp_path / "corpus"))}
    with DagsterInstance.ephemeral() as instance:
        def tick(sensor):  # noqa: ANN001, ANN202
            with build_sensor_context(instance=instance, resources=resources) as context:
                result = sensor(context)
            for event in getattr(result, "asset_events", None) or []:
                instance.report_runless_asset_event(event)
            return result

        waiting = tick(corpus_shard_sensor)
        assert "waiting for benchmark_ngrams" in waiting.skip_reason.skip_message and not waiting.run_requests
        assert not instance.get_dynamic_partitions("corpus_shard")  # nothing added yet
        request = tick(benchmark_sensor)
        assert [r.asset_selection for r in request.run_requests] == [[benchmark_ngrams.key]]
        assert {e.asset_key.to_user_string() for e in request.asset_events} <= {"decontamination_settings"}
        assert materialize([benchmark_ngrams], instance=instance, resources=resources).success
        assert "is current" in tick(benchmark_sensor).skip_message
        assert [r.partition_key for r in tick(corpus_shard_sensor).run_requests] == ["shard-a"]
        # a benchmark file added: a new version, so benchmark_ngrams again (a new run key), and new inputs wait
        bench = tmp_path / "benchmarks"
        bench.mkdir()
        (bench / "mini.jsonl").write_text('{"id": "m/1", "question": "' + " ".join(f"w{i}" for i in range(20)) + '"}\n')
        resources["inputs"] = InputsResource(queries_dir=str(tmp_path), corpus_dir=str(tmp_path / "corpus"),
                                             benchmarks_dir=str(bench))
        again = tick(benchmark_sensor)
        assert again.run_requests[0].run_key != request.run_requests[0].run_key
        assert [e.asset_key.to_user_string() for e in again.asset_events] == ["decontamination_settings"]


def test_jobs_schedules_and_sensors_load():
    for job in ("benchmarks_job", "queries_job", "template_index_job", "filter_job", "dedup_job", "shard_job",
                "report_job",
                "lineage_job"):
        assert defs.resolve_job_def(job)
    sensors = {s.name: s for s in defs.sensors}
    assert set(sensors) == {"benchmark_sensor", "corpus_shard_sensor", "query_source_sensor", "automation_sensor",
                            "scheduled_backfill"}
    # nothing runs by itself on a laptop until asked: the eager automation and the nightly backfill are stopped
    assert {n for n, s in sensors.items() if s.default_status == DefaultSensorStatus.STOPPED} == {
        "automation_sensor", "scheduled_backfill"}
    # every job a sensor targets resolves, as the code server loads them; the cron is the backfill sensor's
    defs.get_repository_def().load_all_definitions()
    assert not list(defs.schedules or [])


def test_llm_assets_batch_partitions_per_backfill_run_and_summaries_automate():
    for key in ("templates", "instantiations", "judgements", "matches", "documents", "fineinstructions"):
        policy = defs.resolve_assets_def(key).backfill_policy
        assert policy is not None and policy.max_partitions_per_run == PARTITIONS_PER_RUN > 1, key
    graph = defs.resolve_asset_graph()
    automated = {k.to_user_string() for k in graph.get_all_asset_keys() if graph.get(k).automation_condition}
    # everything (a sensor's first steps again when their input files were replaced)
    assert automated == ASSETS - {"benchmark_ngrams"}  # its sensor's, with automation on or off


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

    class MultiContext(Context):
        def add_asset_metadata(self, metadata, partition_key=None, asset_key=None):
            self.added[(asset_key, partition_key)] = metadata

    def two(key: str) -> list[MaterializeResult]:  # a multi-asset: one result per table
        return [MaterializeResult(asset_key="t1", metadata={"n": 1}, check_results=one(key).check_results),
                MaterializeResult(asset_key="t2", metadata={"n": 2})]

    multi = MultiContext(["a", "b"])
    results = for_each_partition(multi, two)
    assert [r.asset_key.to_user_string() for r in results] == ["t1", "t2"]
    assert set(multi.added) == {(r.asset_key, p) for r in results for p in ("a", "b")}
    assert [c.check_name for c in results[0].check_results] == ["ok"] and not results[1].check_results
    assert results[0].check_results[0].metadata["failed_partitions"].value == "b"


def test_shard_sensor_adds_one_partition_per_new_file_and_observes_a_replaced_one(tmp_path, benchmarks_storage):
    (tmp_path / "shard-a.parquet").write_bytes(b"")
    (tmp_path / "shard-b.jsonl").write_text("")
    with DagsterInstance.ephemeral() as instance:
        def tick():  # noqa: ANN202 - a SensorResult or SkipReason; the daemon records its observations
            inputs = InputsResource(queries_dir=str(tmp_path), corpus_dir=str(tmp_path))
            with build_sensor_context(instance=instance, resources={**build_resources(), "inputs": inputs,
                                                                    "storage": benchmarks_storage}) as context:
                result = corpus_shard_sensor(context)
            for event in getattr(result, "asset_events", None) or []:
                instance.report_runless_asset_event(event)
            return result

        result = tick()
        assert [r.partition_key for r in result.run_requests] == ["shard-a", "shard-b"]
        assert list(result.dynamic_partitions_requests[0].partition_keys) == ["shard-a", "shard-b"]
        files = [e.partition for e in result.asset_events if e.asset_key.to_user_string() == CORPUS_FILES]
        assert files == ["shard-a", "shard-b"]
        # the first tick also records each stage's settings, before the runs it requests
        assert {e.asset_key.to_user_string() for e in result.asset_events if e.partition is None} == {
            s.key for s in STAGES}
        instance.add_dynamic_partitions("corpus_shard", ["shard-a", "shard-b"])
        assert "no new or changed corpus_shard" in tick().skip_message
        first = observed_versions(instance, CORPUS_FILES)
        (tmp_path / "shard-b.jsonl").write_text('{"text": "a re-downloaded dump"}\n')  # same name, new content
        replaced = tick()
        assert not replaced.run_requests  # a re-run is the automation's or the scheduled backfill's to make
        assert [e.partition for e in replaced.asset_events] == ["shard-b"]
        assert observed_versions(instance, CORPUS_FILES)["shard-b"] != first["shard-b"]
        assert "no new or changed" in tick().skip_message


def test_dagster_validates_the_location_as_the_project_declares_it(tmp_path):
    """`dagster definitions validate` from the project root (pyproject's [tool.dagster] / [tool.dg]), as the code
    server loads it: the defs folder merged, every job's resources bound, no warning about the location."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    env = {k: v for k, v in os.environ.items() if k != "DAGSTER_HOME"}
    proc = subprocess.run([str(Path(sys.executable).with_name("dagster")), "definitions", "validate"], cwd=repo,
                          env={**env, "TMPDIR": str(tmp_path)}, capture_output=True, text=True, timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    assert "Validation successful for code location fineinstructions_dagster." in out
    assert "WARNING" not in out, out[-3000:]


def test_scheduled_backfill_waits_for_a_cron_tick_then_backfills_everything_new(tmp_path, monkeypatch):
    """Through `evaluate_tick`, the daemon's own path (it checks what a direct call does not, e.g. that a sensor
    emitting a backfill has an asset selection holding it): the first tick after start only sets the cursor; at the
    next cron tick, inputs nobody has run are observed and the whole graph is one backfill."""
    from fineinstructions_dagster.defs.scheduled_backfill import SCHEDULED_TAG, scheduled_backfill
    from fineinstructions_dagster.sample import build_sample

    build_sample(tmp_path, shards=("faq",), max_docs_per_shard=2, max_queries=4)
    monkeypatch.setenv("FINEINSTRUCTIONS_BACKFILL_CRON", "* * * * *")
    inputs = InputsResource(queries_dir=str(tmp_path / "queries"), corpus_dir=str(tmp_path / "corpus"))
    with DagsterInstance.ephemeral() as instance:
        def tick(cursor: str | None):  # noqa: ANN202 - SensorExecutionData
            with build_sensor_context(instance=instance, cursor=cursor, definitions=defs,
                                      resources={**build_resources(), "inputs": inputs}) as context:
                return scheduled_backfill.evaluate_tick(context)

        started = tick(None)
        assert not started.run_requests and "started" in started.skip_message
        due = tick(str(float(started.cursor) - 60))  # a minute later
        assert observed_versions(instance, CORPUS_FILES).keys() == {"faq"}
        [request] = due.run_requests
        assert request.tags[SCHEDULED_TAG] == "true"
        graph = defs.resolve_asset_graph()
        assert request.asset_graph_subset.asset_keys == graph.materializable_asset_keys


def test_observing_the_input_files_from_the_ui_records_only_versioned_observations(tmp_path):
    """The UI's "Observe sources" on corpus_files: one observation per known shard, each with its data version (an
    observation without one would read as a change of the shard)."""
    from dagster import AssetKey
    from dagster._core.definitions.observe import observe

    from fineinstructions_dagster.defs.observations import corpus_files

    (tmp_path / "a.jsonl").write_text('{"text": "x"}\n')
    (tmp_path / "b.jsonl").write_text('{"text": "y"}\n')
    with DagsterInstance.ephemeral() as instance:
        instance.add_dynamic_partitions("corpus_shard", ["a", "b"])
        assert observe([corpus_files], instance=instance, partition_key="a",
                       resources={"inputs": InputsResource(corpus_dir=str(tmp_path))}).success
        records = instance.fetch_observations(AssetKey(CORPUS_FILES), limit=10).records
        assert sorted(r.asset_observation.partition for r in records) == ["a", "b"]
        assert all("dagster/data_version" in (r.asset_observation.tags or {}) for r in records)
        assert observed_versions(instance, CORPUS_FILES).keys() == {"a", "b"}
