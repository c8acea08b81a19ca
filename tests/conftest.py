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
