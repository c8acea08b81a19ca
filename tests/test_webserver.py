"""`dagster dev` loads the code location from workspace.yaml, shows every asset, and runs launched
through its GraphQL API (what the UI's Materialize button sends) materialize a shard partition."""

from __future__ import annotations

import shutil
import time

import polars as pl
import pytest
from dagster import DagsterInstance

from fineinstructions_dagster.defs.partitions import EVERY_BUCKET_RANGE
from tests.servers import LOCATION, REPO, start_dagster_dev


@pytest.fixture(scope="module")
def dagster_dev(tmp_path_factory, smoke_model, sample_inputs):
    home = tmp_path_factory.mktemp("dagster_home")
    shutil.copy(REPO / "deploy" / "dagster.local.yaml", home / "dagster.yaml")
    root = tmp_path_factory.mktemp("root")
    with DagsterInstance.from_config(str(home)) as instance:  # what the sensors do on their first tick
        instance.add_dynamic_partitions("query_source", ["python_faq"])
        instance.add_dynamic_partitions("corpus_shard", ["faq", "tutorial"])
    env = {"DAGSTER_HOME": str(home), "FINEINSTRUCTIONS_ROOT": str(root),
           "FINEINSTRUCTIONS_QUERIES": str(sample_inputs / "queries"),
           "FINEINSTRUCTIONS_CORPUS": str(sample_inputs / "corpus"), "FINEINSTRUCTIONS_PROFILE": "smoke",
           "FINEINSTRUCTIONS_SMOKE_MODEL": str(smoke_model), "FINEINSTRUCTIONS_LLM_BACKEND": "transformers"}
    with start_dagster_dev(env, home / "dagster_dev.log") as server:
        yield server.url, server.port, root


def wait_for_run(client, run_id: str, timeout: float = 420) -> str:
    from dagster import DagsterRunStatus

    deadline = time.time() + timeout
    while time.time() < deadline:
        status = client.get_run_status(run_id)
        if status in (DagsterRunStatus.SUCCESS, DagsterRunStatus.FAILURE, DagsterRunStatus.CANCELED):
            return status.value
        time.sleep(2)
    return "TIMEOUT"


def test_code_location_loads_with_every_asset(dagster_dev):
    from dagster_graphql import DagsterGraphQLClient

    _, port, _ = dagster_dev
    client = DagsterGraphQLClient("127.0.0.1", port_number=port)
    data = client._execute("""{ workspaceOrError { ... on Workspace { locationEntries {
        name locationOrLoadError { __typename ... on PythonError { message } } } } }
        assetNodes { assetKey { path } } }""")
    entries = {e["name"]: e["locationOrLoadError"] for e in data["workspaceOrError"]["locationEntries"]}
    assert entries[LOCATION]["__typename"] == "RepositoryLocation", entries
    keys = {"/".join(n["assetKey"]["path"]) for n in data["assetNodes"]}
    assert {"user_queries", "templates", "template_bank", "template_index", "documents", "matches",
            "instantiations", "judgements", "fineinstructions", "dataset_report"} <= keys


def test_a_shard_partition_materializes_through_the_webserver(dagster_dev):
    from dagster_graphql import DagsterGraphQLClient

    _, port, root = dagster_dev
    client = DagsterGraphQLClient("127.0.0.1", port_number=port)
    steps = (("queries_job", "python_faq"), ("template_index_job", None), ("filter_job", "faq"), ("dedup_job", None),
             ("shard_job", "faq"))
    for job, partition in steps:
        tags = {"dagster/partition": partition} if partition else {}
        if job == "dedup_job":  # every bucket range in one run (Dagster's partition-range tags)
            tags = EVERY_BUCKET_RANGE
        run_id = client.submit_job_execution(job, repository_location_name=LOCATION, tags=tags)
        assert wait_for_run(client, run_id) == "SUCCESS", f"{job} run {run_id} did not succeed"
    pairs = pl.read_parquet(root / "fineinstructions" / "faq.parquet")
    assert pairs.height > 0 and pairs["pair_id"].is_unique().all()
