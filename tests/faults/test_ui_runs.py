"""Runs launched the way operators launch them (the webserver's GraphQL API, the daemon's queue) with the vLLM
backend and an empty generation cache: a run reaches SUCCESS (its run worker exits once the engine is shut
down); Terminate ends the run, leaves no engine process and frees the `gpu` slot; a SIGKILLed run worker takes
its engine with it, run monitoring marks the run failed and frees its slot, and the next run
completes unaided."""

from __future__ import annotations

import os
import shutil
import signal
import sqlite3
import time
from pathlib import Path

import pytest
from dagster import AssetKey, DagsterInstance, DagsterRunStatus, RunsFilter

from fineinstructions_dagster.defs.run_health import run_worker_pid
from tests.faults.conftest import alive, gpu_slot_holders, needs_vllm, new_home, process_tree, step_started, wait_until
from tests.servers import LOCATION, start_dagster_dev

pytestmark = [needs_vllm, pytest.mark.vllm, pytest.mark.slow]
FINISHED = (DagsterRunStatus.SUCCESS, DagsterRunStatus.FAILURE, DagsterRunStatus.CANCELED)


@pytest.fixture(scope="module")
def ui(tmp_path_factory, smoke_model, sample_inputs):
    home = new_home(tmp_path_factory.mktemp("ui") / "home")
    root = tmp_path_factory.mktemp("ui-root")
    with DagsterInstance.from_config(str(home)) as instance:  # what the query sensor does on its first tick
        instance.add_dynamic_partitions("query_source", ["python_faq"])
    env = {"DAGSTER_HOME": str(home), "FINEINSTRUCTIONS_ROOT": str(root),
           "FINEINSTRUCTIONS_QUERIES": str(sample_inputs / "queries"),
           "FINEINSTRUCTIONS_CORPUS": str(sample_inputs / "corpus"), "FINEINSTRUCTIONS_PROFILE": "smoke",
           "FINEINSTRUCTIONS_SMOKE_MODEL": str(smoke_model), "FINEINSTRUCTIONS_LLM_BACKEND": "vllm",
           "VLLM_LOGGING_LEVEL": "ERROR", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    with start_dagster_dev(env, home / "dagster_dev.log") as server, \
            DagsterInstance.from_config(str(home)) as instance:
        from dagster_graphql import DagsterGraphQLClient

        # The queries job waits for benchmark_ngrams; on a new deployment benchmark_sensor builds it by itself.
        wait_until("benchmark_sensor to build benchmark_ngrams", lambda: instance.get_latest_materialization_event(
            AssetKey("benchmark_ngrams")), timeout=300, poll=1)
        yield DagsterGraphQLClient("127.0.0.1", port_number=server.port), instance, root, server


def cached_generations(root: Path) -> int:
    db = root / "_cache" / "generations.sqlite"
    if not db.exists():
        return 0
    with sqlite3.connect(db) as con:
        return con.execute("SELECT count(*) FROM sqlite_master WHERE type='table'").fetchone()[0] and sum(
            con.execute(f"SELECT count(*) FROM {t}").fetchone()[0]  # noqa: S608 (table names from sqlite_master)
            for (t,) in con.execute("SELECT name FROM sqlite_master WHERE type='table'").fetchall())


def empty_cache(root: Path) -> None:
    shutil.rmtree(root / "_cache", ignore_errors=True)


def launch_templates(client) -> str:
    """queries_job on python_faq: user_queries, then templates (the genericizer on vLLM, pool `gpu`)."""
    return client.submit_job_execution("queries_job", repository_location_name=LOCATION,
                                       tags={"dagster/partition": "python_faq"})


def finished(instance: DagsterInstance, run_id: str, timeout: float) -> DagsterRunStatus:
    return wait_until(f"run {run_id} to finish", lambda: (s := instance.get_run_by_id(run_id).status) in FINISHED
                      and s, timeout=timeout, poll=1)  # type: ignore[return-value]


def in_the_llm_step(instance: DagsterInstance, run_id: str) -> list:
    """Wait until the run's `templates` step runs; then its run worker's process tree (the worker, which runs
    the steps and their engines in process, and whatever it started)."""
    wait_until("the templates step to start", lambda: step_started(instance, "templates",
                                                                   RunsFilter(run_ids=[run_id])), timeout=300)
    pid = wait_until("the run worker's pid", lambda: run_worker_pid(instance, instance.get_run_by_id(run_id)),
                     timeout=30)
    time.sleep(3)  # into the engine's start or its generation
    return wait_until("the run worker's processes", lambda: process_tree(pid), timeout=30)  # type: ignore[return-value]


def test_code_location_loads_with_every_asset(ui):
    client, _, _, _ = ui
    data = client._execute("""{ workspaceOrError { ... on Workspace { locationEntries {
        name locationOrLoadError { __typename ... on PythonError { message } } } } }
        assetNodes { assetKey { path } } }""")
    entries = {e["name"]: e["locationOrLoadError"] for e in data["workspaceOrError"]["locationEntries"]}
    assert entries[LOCATION]["__typename"] == "RepositoryLocation", entries
    keys = {"/".join(n["assetKey"]["path"]) for n in data["assetNodes"]}
    assert {"user_queries", "templates", "template_bank", "template_index", "documents", "matches",
            "instantiations", "judgements", "fineinstructions", "dataset_report"} <= keys


def test_a_run_from_the_ui_with_vllm_and_no_cache_succeeds(ui):
    client, instance, root, server = ui
    empty_cache(root)
    run_id = launch_templates(client)
    status = finished(instance, run_id, timeout=600)
    assert status == DagsterRunStatus.SUCCESS, server.log_tail()
    assert cached_generations(root) > 0  # the genericizer really ran (nothing was served from a cache)
    pid = run_worker_pid(instance, instance.get_run_by_id(run_id))
    assert pid and wait_until("the run worker to exit", lambda: not alive(process_tree(pid)), timeout=60)
    assert not gpu_slot_holders(instance)


def test_terminate_ends_the_run_its_engine_and_frees_the_slot(ui):
    client, instance, root, _ = ui
    empty_cache(root)
    run_id = launch_templates(client)
    tree = in_the_llm_step(instance, run_id)
    client.terminate_run(run_id)
    assert finished(instance, run_id, timeout=180) == DagsterRunStatus.CANCELED
    wait_until("no process of the terminated run", lambda: not alive(tree), timeout=90)
    wait_until("the gpu slot to be free", lambda: run_id not in gpu_slot_holders(instance), timeout=60)


def test_sigkilled_run_worker_frees_everything_and_the_next_run_completes(ui):
    client, instance, root, server = ui
    empty_cache(root)
    run_id = launch_templates(client)
    tree = in_the_llm_step(instance, run_id)
    os.kill(tree[0].pid, signal.SIGKILL)  # the run worker, as the OOM killer or an operator would
    wait_until("its processes (and in-process engine) to die with it", lambda: not alive(tree), timeout=60)
    assert finished(instance, run_id, timeout=120) == DagsterRunStatus.FAILURE  # run monitoring noticed
    wait_until("the gpu slot to be free", lambda: not gpu_slot_holders(instance), timeout=120)
    empty_cache(root)
    again = launch_templates(client)
    assert finished(instance, again, timeout=600) == DagsterRunStatus.SUCCESS, server.log_tail()
