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


# `make test-fast` leaves out the slow tier: tests that run the whole graph (the `pipeline` fixture, marked here)
# or start servers, `dagster dev`, a CLI run of the graph or LLM engines in processes of their own (marked where
# they are); a CLI call that stops in seconds (preflight, `dagster definitions validate`) stays in the fast tier.
SLOW_FIXTURES = {"pipeline"}


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


def smoke_env(root: Path, smoke_model: Path, sample_inputs: Path) -> dict[str, str]:
    """The environment of a smoke-profile run over the offline sample with the smoke model (transformers)."""
    return {"FINEINSTRUCTIONS_ROOT": str(root), "FINEINSTRUCTIONS_QUERIES": str(sample_inputs / "queries"),
            "FINEINSTRUCTIONS_CORPUS": str(sample_inputs / "corpus"), "FINEINSTRUCTIONS_PROFILE": "smoke",
            "FINEINSTRUCTIONS_SMOKE_MODEL": str(smoke_model), "FINEINSTRUCTIONS_LLM_BACKEND": "transformers"}


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory: pytest.TempPathFactory, smoke_model: Path, sample_inputs: Path):
    """The whole graph run once per test module into a fresh root and a fresh instance (on disk, so that the UI's
    GraphQL can be asked about it: tests/ui_staleness.py); the environment stays set for the module's tests.
    Yields (store, instance, run)."""
    from dagster import DagsterInstance

    from fineinstructions_dagster.lib.storage import TableStore
    from fineinstructions_dagster.runner import run_pipeline

    root = tmp_path_factory.mktemp("root")
    with pytest.MonkeyPatch.context() as mp:
        for k, v in smoke_env(root, smoke_model, sample_inputs).items():
            mp.setenv(k, v)
        instance = DagsterInstance.local_temp(str(tmp_path_factory.mktemp("dagster_home")))
        yield TableStore(root), instance, run_pipeline(instance, log=lambda _: None)


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
