"""Which runs the command-line runner may release: its own host's tagged runs whose process is gone, including a
pid reused by a restarted runner; never a live runner's run, never an untagged (daemon-launched) one."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

from dagster import DagsterInstance, DagsterRun, DagsterRunStatus

from fineinstructions_dagster.defs.run_health import HOST_TAG, PID_TAG, START_TAG, release_dead_runs, runner_tags
from fineinstructions_dagster.lib.process import process_start


def add_run(instance: DagsterInstance, tags: dict[str, str]) -> str:
    run = DagsterRun(job_name="shard_job", status=DagsterRunStatus.STARTED, tags=tags)
    instance.add_run(run)
    return run.run_id


def test_release_only_dead_runners_runs():
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(gone.stdout)
    host = socket.gethostname()
    with DagsterInstance.ephemeral() as instance:
        dead = add_run(instance, {PID_TAG: str(dead_pid), HOST_TAG: host, START_TAG: "1"})
        reused = add_run(instance, {PID_TAG: str(os.getpid()), HOST_TAG: host, START_TAG: "1"})  # pid reused
        live = add_run(instance, runner_tags())
        elsewhere = add_run(instance, {PID_TAG: str(dead_pid), HOST_TAG: host + "-other", START_TAG: "1"})
        daemon = add_run(instance, {})
        released = release_dead_runs(instance)
        assert set(released) == {dead, reused}
        status = {r: instance.get_run_by_id(r).status for r in (dead, reused, live, elsewhere, daemon)}
        assert status[dead] == status[reused] == DagsterRunStatus.FAILURE
        assert status[live] == status[elsewhere] == status[daemon] == DagsterRunStatus.STARTED
    assert process_start(os.getpid()) == process_start(os.getpid()) is not None
