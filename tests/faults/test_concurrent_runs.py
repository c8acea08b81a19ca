"""Two runs on one instance: an export launched by hand while another run's dbt build is in progress (its tests
planned, not yet evaluated) is refused with a message that says so, not that the data is wrong; once the build
has finished, the same export runs. (Automation never starts it then: it waits while an input is in progress.)"""

from __future__ import annotations

import fcntl
import os
import subprocess
import sys

import pytest
from dagster import DagsterInstance, DagsterRunStatus, RunsFilter, materialize

from fineinstructions_dagster.defs.quality import assets as quality
from tests.faults.conftest import cli_env, step_started, wait_until
from tests.servers import REPO

pytestmark = [pytest.mark.slow]

BUILD = """
from dagster import DagsterInstance, materialize
from fineinstructions_dagster.definitions import ASSETS
from fineinstructions_dagster.defs.quality.assets import QUALITY_SELECTION
from fineinstructions_dagster.defs.resources import build_resources
with DagsterInstance.get() as instance:
    r = materialize(list(ASSETS), selection=QUALITY_SELECTION, instance=instance,
                    resources=build_resources(), raise_on_error=False)
    raise SystemExit(0 if r.success else 1)
"""


def export(instance: DagsterInstance, shard: str):
    from fineinstructions_dagster.definitions import ASSETS
    from fineinstructions_dagster.defs.resources import build_resources

    return materialize(list(ASSETS), selection=["export_chat", "export_packed"],
                       partition_key=shard, instance=instance, resources=build_resources(), raise_on_error=False)


def test_export_during_another_runs_dbt_build(clean_run, smoke_model, sample_inputs, monkeypatch, tmp_path):
    home, root = clean_run
    env = cli_env(home, root, sample_inputs, smoke_model)
    for k in ("DAGSTER_HOME", "FINEINSTRUCTIONS_ROOT", "FINEINSTRUCTIONS_PROFILE", "FINEINSTRUCTIONS_SMOKE_MODEL",
              "FINEINSTRUCTIONS_QUERIES", "FINEINSTRUCTIONS_CORPUS"):
        monkeypatch.setenv(k, env[k])
    lock = quality.quality_db_path(root).with_name(".lock")
    with open(lock, "w") as held, DagsterInstance.from_config(str(home)) as instance:
        fcntl.flock(held, fcntl.LOCK_EX)  # the other build stalls inside its step, its tests planned
        log = tmp_path / "build.log"
        with open(log, "wb") as out:
            build = subprocess.Popen([sys.executable, "-c", BUILD], env={**os.environ, **env}, cwd=REPO,
                                     stdout=out, stderr=subprocess.STDOUT)

        def started() -> str | None:
            assert build.poll() is None, f"the other build exited early:\n{log.read_text()[-3000:]}"
            return step_started(instance, "dbt_quality", RunsFilter(statuses=[DagsterRunStatus.STARTED]))

        try:
            building = wait_until("the other run's dbt build to start", started, timeout=300)
            refused = export(instance, "faq")
            assert not refused.success
            failure = next(e for e in refused.all_events if e.is_step_failure)
            message = failure.step_failure_data.user_failure_data.description
            assert "(not finished)" in message and "A dbt build is in progress" in message
            assert "data is not known to be wrong" in message and "Fix the data" not in message

            fcntl.flock(held, fcntl.LOCK_UN)  # the build goes on
            assert build.wait(timeout=300) == 0, log.read_text()[-3000:]
            assert instance.get_run_by_id(building).status == DagsterRunStatus.SUCCESS
            assert export(instance, "faq").success
        finally:
            if build.poll() is None:
                build.kill()
