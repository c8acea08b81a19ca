"""Shared fixtures: a fake LLM engine, the smoke model, a small offline sample."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from fineinstructions_dagster.llm.engines import EngineInfo, GenerationRequest, GenerationResult  # noqa: E402


class FakeEngine:
    """Answers each request with `respond(request)`; counts what it was asked, like a real engine would bill."""

    def __init__(self, respond: Callable[[GenerationRequest], str], finish_reason: str = "stop"):
        self.info = EngineInfo("fake", "fake-model", "r1")
        self.respond = respond
        self.finish_reason = finish_reason
        self.calls = 0
        self.requests = 0

    def generate(self, requests: list[GenerationRequest]) -> list[GenerationResult]:
        self.calls += 1
        self.requests += len(requests)
        return [GenerationResult(text=self.respond(r), prompt=json.dumps(r.chat()), prompt_tokens=10,
                                 completion_tokens=5, finish_reason=self.finish_reason) for r in requests]


# `make test-fast` leaves out the slow tier: tests that run the whole graph (the `pipeline` fixtures, marked here)
# or start servers, `dagster dev`, a CLI run of the graph or LLM engines in processes of their own (marked where
# they are); a CLI call that stops in seconds (preflight, `dagster definitions validate`) stays in the fast tier.
SLOW_FIXTURES = {"pipeline", "pipeline_copy"}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if SLOW_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session", autouse=True)
def _close_engines_at_end():
    yield
    from fineinstructions_dagster.llm.engines import close_engines

    close_engines()


@pytest.fixture
def fake_engine() -> type[FakeEngine]:
    return FakeEngine


@pytest.fixture(scope="session")
def smoke_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from fineinstructions_dagster.llm.smoke import build_smoke_model

    return build_smoke_model(tmp_path_factory.mktemp("models") / "smoke")


@pytest.fixture(scope="session")
def sample_inputs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from fineinstructions_dagster.sample import build_sample

    out = tmp_path_factory.mktemp("inputs")
    build_sample(out, shards=("tutorial", "faq"), max_docs_per_shard=12, max_queries=16)
    return out


@pytest.fixture(scope="session")
def benchmarks_storage(tmp_path_factory: pytest.TempPathFactory):
    """A StorageResource whose root holds `benchmark_ngrams` built for the benchmarks in force (the builtin
    HumanEval): what the input sensors wait for before they add a source or shard."""
    from dagster import materialize

    from fineinstructions_dagster.defs.decontamination.assets import benchmark_ngrams
    from fineinstructions_dagster.defs.resources import StorageResource, build_resources

    storage = StorageResource(root=str(tmp_path_factory.mktemp("benchmarks_root")))
    assert materialize([benchmark_ngrams], resources={**build_resources(), "storage": storage}).success
    return storage


def smoke_env(root: Path, smoke_model: Path, sample_inputs: Path) -> dict[str, str]:
    """The environment of a smoke-profile run over the offline sample with the smoke model (transformers)."""
    return {"FINEINSTRUCTIONS_ROOT": str(root), "FINEINSTRUCTIONS_QUERIES": str(sample_inputs / "queries"),
            "FINEINSTRUCTIONS_CORPUS": str(sample_inputs / "corpus"), "FINEINSTRUCTIONS_PROFILE": "smoke",
            "FINEINSTRUCTIONS_SMOKE_MODEL": str(smoke_model), "FINEINSTRUCTIONS_LLM_BACKEND": "transformers"}


@pytest.fixture(scope="session")
def pipeline_run(tmp_path_factory: pytest.TempPathFactory, smoke_model: Path, sample_inputs: Path):
    """The whole graph, run once per session into a fresh root and a fresh instance on disk (so that the UI's
    GraphQL can be asked about it: tests/ui_staleness.py). Yields (root, instance folder, run summary); the
    tests use it through `pipeline` (read-only) or `pipeline_copy` (a copy of their own to change)."""
    from dagster import DagsterInstance

    from fineinstructions_dagster.runner import run_pipeline

    root, home = tmp_path_factory.mktemp("root"), tmp_path_factory.mktemp("dagster_home")
    with pytest.MonkeyPatch.context() as mp:
        for k, v in smoke_env(root, smoke_model, sample_inputs).items():
            mp.setenv(k, v)
        with DagsterInstance.local_temp(str(home)) as instance:
            run = run_pipeline(instance, log=lambda _: None)
    yield root, home, run


def _pipeline_at(root: Path, home: Path, run, smoke_model: Path, sample_inputs: Path):  # noqa: ANN001, ANN202
    from dagster import DagsterInstance

    from fineinstructions_dagster.lib.storage import TableStore

    with pytest.MonkeyPatch.context() as mp:
        for k, v in smoke_env(root, smoke_model, sample_inputs).items():
            mp.setenv(k, v)
        with DagsterInstance.local_temp(str(home)) as instance:
            yield TableStore(root), instance, run


@pytest.fixture(scope="module")
def pipeline(pipeline_run, smoke_model: Path, sample_inputs: Path):
    """The session's graph run, for tests that only read it (a test that changes a table or the instance uses
    `pipeline_copy`); the environment points at its root for the module's tests. Yields (store, instance, run)."""
    yield from _pipeline_at(*pipeline_run, smoke_model, sample_inputs)


@pytest.fixture(scope="module")
def pipeline_copy(pipeline_run, tmp_path_factory: pytest.TempPathFactory, smoke_model: Path, sample_inputs: Path):
    """A copy of the session's graph run (its root, generation cache included, and its instance) for a module
    whose tests change data or run steps again; shared by that module's tests. Yields (store, instance, run)."""
    root, home = copy_pipeline_run(pipeline_run, tmp_path_factory.mktemp("copy"))
    yield from _pipeline_at(root, home, pipeline_run[2], smoke_model, sample_inputs)


def copy_pipeline_run(pipeline_run, dest: Path) -> tuple[Path, Path]:  # noqa: ANN001
    """The session run's root and instance folder copied under `dest`: (root, instance folder)."""
    import shutil

    root, home, _ = pipeline_run
    shutil.copytree(root, dest / "root")
    shutil.copytree(home, dest / "dagster_home")
    return dest / "root", dest / "dagster_home"


@pytest.fixture
def moto_s3(monkeypatch: pytest.MonkeyPatch):
    """A local moto S3 server, empty, with the AWS_* variables pointing at it; yields a boto3 client."""
    boto3 = pytest.importorskip("boto3")
    import urllib.request

    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    # moto keeps one in-memory S3 per process: start every test from an empty one.
    urllib.request.urlopen(urllib.request.Request(f"http://{host}:{port}/moto-api/reset", method="POST")).read()
    for k, v in {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1",
                 "AWS_ENDPOINT_URL": f"http://{host}:{port}"}.items():
        monkeypatch.setenv(k, v)
    yield boto3.client("s3", endpoint_url=f"http://{host}:{port}")
    server.stop()
