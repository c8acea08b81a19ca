"""Runs whose process is gone: found, marked failed, their `gpu` pool slots freed.

Dagster's run monitoring (daemon) does this for run launchers that can check a run worker's health; the
default local launcher cannot, so a run whose worker was SIGKILLed stays STARTED and holds its pool slot
forever. `LocalRunLauncher` adds the health check for one-host deployments (`make dev`,
deploy/dagster.local.yaml), and the command-line runner, which has no daemon, calls `release_dead_runs`.
"""

from __future__ import annotations

import logging
import os
import re
import socket

from dagster import DagsterEventType, DagsterInstance, DagsterRun, DagsterRunStatus, DefaultRunLauncher, RunsFilter
from dagster._core.launcher.base import CheckRunHealthResult, WorkerStatus  # a launcher's health-check types

from fineinstructions_dagster.lib.process import pid_alive, process_start

log = logging.getLogger(__name__)

PID_TAG = "fineinstructions/pid"  # set by the command-line runner on its in-process runs
HOST_TAG = "fineinstructions/host"
START_TAG = "fineinstructions/pid_start"  # the process's start time: a reused pid is another process
_STARTED = re.compile(r"Started process for run \(pid: (\d+)\)")
_LIVE = [DagsterRunStatus.STARTING, DagsterRunStatus.STARTED, DagsterRunStatus.CANCELING]


def runner_tags() -> dict[str, str]:
    """Tags the command-line runner puts on its runs, so a later runner can tell whether their process lives."""
    return {PID_TAG: str(os.getpid()), HOST_TAG: socket.gethostname(), START_TAG: process_start(os.getpid()) or ""}


def run_worker_pid(instance: DagsterInstance, run: DagsterRun, from_events: bool = True) -> int | None:
    """The pid of the process executing `run` on this host, or None where it is not known here: the runner's
    tag (with this host's name), else, with `from_events` (one-host deployments only: the event names no
    host), the engine event the code server logs when it starts a run worker."""
    if PID_TAG in run.tags:
        return int(run.tags[PID_TAG]) if run.tags.get(HOST_TAG) == socket.gethostname() else None
    if not from_events:
        return None
    for record in instance.all_logs(run.run_id, of_type=DagsterEventType.ENGINE_EVENT):
        m = _STARTED.search(record.message or "")
        if m:
            return int(m.group(1))
    return None


def worker_gone(instance: DagsterInstance, run: DagsterRun) -> bool:
    """The runner that tagged `run` on this host is not running any more (its pid is gone, or now belongs to a
    process that started at another time)."""
    pid = run_worker_pid(instance, run, from_events=False)
    if pid is None:
        return False
    started = run.tags.get(START_TAG)
    return not pid_alive(pid) or bool(started and process_start(pid) != started)


def release_dead_runs(instance: DagsterInstance) -> list[str]:
    """Mark every live-looking run of this host's command-line runner (tagged with its pid and host) whose
    process is gone as failed, and free the concurrency slots of every finished run. Runs launched by a daemon
    are its run monitoring's business (they may live on other hosts). Returns the run ids released."""
    released = []
    for record in instance.get_run_records(RunsFilter(statuses=_LIVE)):
        run = record.dagster_run
        if not worker_gone(instance, run):
            continue
        msg = f"run worker (pid {run.tags.get(PID_TAG)}) is gone: marked failed, its pool slots freed"
        if run.status == DagsterRunStatus.CANCELING:
            instance.report_run_canceled(run, msg)
        else:
            instance.report_run_failed(run, msg)
        released.append(run.run_id)
    for run_id in instance.event_log_storage.get_concurrency_run_ids():
        found = instance.get_run_by_id(run_id)
        if found is None or found.is_finished:
            instance.event_log_storage.free_concurrency_slots_for_run(run_id)
            if run_id not in released:
                released.append(run_id)
    for run_id in released:
        log.warning("released run %s: its process is gone", run_id)
    return released


class LocalRunLauncher(DefaultRunLauncher):
    """The default launcher plus a worker health check by pid, so the daemon's run monitoring fails a run
    whose worker was killed (and then frees its pool slots after `free_slots_after_run_end_seconds`).
    For deployments where the daemon and the code server share one host."""

    @property
    def supports_check_run_worker_health(self) -> bool:
        return True

    def check_run_worker_health(self, run: DagsterRun) -> CheckRunHealthResult:
        pid = run_worker_pid(self._instance, run)
        if pid is None:
            # Not knowable here (another host, or the start event not written yet): never fail a run on a guess.
            return CheckRunHealthResult(WorkerStatus.RUNNING, "no run worker pid recorded on this host")
        if pid_alive(pid):
            return CheckRunHealthResult(WorkerStatus.RUNNING)
        return CheckRunHealthResult(WorkerStatus.FAILED, f"run worker process {pid} is gone")
