"""`fineinstructions run` SIGKILLed in the middle of `instantiations` (real vLLM engine, empty generation
cache, a real Dagster instance on disk): the killed run keeps its `gpu` slot until the next run releases it;
the next run completes unaided; no process of the killed run is left; and its pairs are exactly those of an
uninterrupted run (none lost, none duplicated).

The uninterrupted run and the killed one each start from an empty root and generation cache, so this is also
the suite's check that two fresh vLLM runs agree: every template, match, instantiation, judgement, pair and
control id of one is in the other (the genericizer's and the judge's outputs were all made afresh by each)."""

from __future__ import annotations

import os
import signal
import subprocess

import pytest
from dagster import DagsterInstance, DagsterRunStatus, RunsFilter

from fineinstructions_dagster.lib.storage import TableStore
from tests.faults.conftest import (
    CLI,
    alive,
    cli_env,
    gpu_slot_holders,
    needs_vllm,
    new_home,
    pair_ids,
    process_tree,
    run_cli,
    step_started,
    wait_until,
)
from tests.servers import REPO

pytestmark = [needs_vllm, pytest.mark.vllm, pytest.mark.slow]


def test_sigkill_in_instantiations_then_the_next_run_completes_with_the_same_pairs(
        tmp_path, smoke_model, sample_inputs, clean_run):
    uninterrupted = pair_ids(clean_run[1])
    home, root = new_home(tmp_path / "home"), tmp_path / "root"
    env = cli_env(home, root, sample_inputs, smoke_model)
    log = open(tmp_path / "killed.log", "wb")  # noqa: SIM115 (closed below)
    proc = subprocess.Popen([CLI, "run"], env=env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        with DagsterInstance.from_config(str(home)) as instance:
            killed_run = wait_until("instantiations to start", lambda: step_started(
                instance, "instantiations", RunsFilter(statuses=[DagsterRunStatus.STARTED])), timeout=900)
            tree = process_tree(proc.pid)
            assert killed_run in gpu_slot_holders(instance)  # the slot the next run would wait for
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
            wait_until("every process of the killed run to end", lambda: not alive(tree), timeout=60)
            # The fault as an operator meets it: the run still looks alive and still holds the gpu slot.
            assert instance.get_run_by_id(killed_run).status == DagsterRunStatus.STARTED
            assert killed_run in gpu_slot_holders(instance)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        log.close()

    again = run_cli(env)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert f"released run {killed_run[:8]}" in again.stdout
    with DagsterInstance.from_config(str(home)) as instance:
        assert instance.get_run_by_id(killed_run).status == DagsterRunStatus.FAILURE
        assert not gpu_slot_holders(instance)
    ids = pair_ids(root)
    assert len(ids) == len(set(ids)), "a pair id is duplicated across shards"
    assert sorted(ids) == sorted(uninterrupted), "pairs lost or added against the uninterrupted run"
    fresh, other = TableStore(str(root)), TableStore(str(clean_run[1]))
    for table, key in (("templates", "template_id"), ("matches", "match_id"), ("instantiations", "instantiation_id"),
                       ("judgements", "judgement_id"), ("control_judgements", "control_id")):
        assert fresh.partitions(table) == other.partitions(table), table
        for part in other.partitions(table):
            expected = sorted(other.read(table, part)[key])
            assert sorted(fresh.read(table, part)[key]) == expected and expected, (table, part)
