"""vLLM on CPU sizes its KV cache from the need (model shape x batch), not as a share of the machine's RAM."""

from __future__ import annotations

import json
import subprocess
import sys
import types
from pathlib import Path
from typing import Any

import pytest

from fineinstructions_dagster.llm import engines
from fineinstructions_dagster.llm.engines import (
    CPU_KV_CACHE_CAP,
    CPU_KV_CACHE_FLOOR,
    GiB,
    cpu_kv_cache_bytes,
    kv_bytes_per_token,
    vllm_available,
)

# Llama-3.1-8B's shape: GQA with 8 KV heads of 128 dims over 32 layers.
LLAMA_8B = {"num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8, "hidden_size": 4096,
            "torch_dtype": "bfloat16"}
# The smoke model's shape (fineinstructions_dagster.llm.smoke.ARCH) with a float32 dtype.
SMOKE = {"num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 4, "hidden_size": 256,
         "torch_dtype": "float32"}


def config_file(tmp_path: Path, config: dict[str, Any]) -> dict[str, Any]:
    (tmp_path / "config.json").write_text(json.dumps(config))
    read = engines._model_config(str(tmp_path), None)
    assert read is not None
    return read


def test_per_token_bytes_from_config_json(tmp_path):
    # 2 (K and V) x 32 layers x 8 KV heads x 128 head dims x 2 bytes = 128 KiB per token.
    assert kv_bytes_per_token(config_file(tmp_path, LLAMA_8B)) == 2 * 32 * 8 * 128 * 2 == 128 << 10
    # vLLM's "auto" dtype on CPU downcasts float32 checkpoints to bfloat16; an explicit float32 doubles it.
    assert kv_bytes_per_token(SMOKE) == 2 * 2 * 4 * 64 * 2
    assert kv_bytes_per_token(SMOKE, "float32") == 2 * kv_bytes_per_token(SMOKE)
    # head_dim given explicitly, KV heads defaulting to attention heads, the LM's shape inside text_config.
    assert kv_bytes_per_token({"num_hidden_layers": 2, "num_attention_heads": 4, "hidden_size": 100,
                               "head_dim": 64}) == 2 * 2 * 4 * 64 * 2
    assert kv_bytes_per_token({"text_config": SMOKE}) == kv_bytes_per_token(SMOKE)


def test_kv_cache_size_follows_the_need_within_floor_and_cap(tmp_path):
    smoke = config_file(tmp_path, SMOKE)
    per_token = kv_bytes_per_token(smoke)
    # The batch at full length, when that lies between the floor and the cap.
    assert cpu_kv_cache_bytes(smoke, 2048, max_num_seqs=128) == per_token * 2048 * 128 == 512 << 20
    # vLLM's CPU default batch (256 sequences) at 4096 tokens: 2 GiB, the cap.
    assert cpu_kv_cache_bytes(smoke, 4096) == CPU_KV_CACHE_CAP
    # A small need gets the floor.
    assert cpu_kv_cache_bytes(smoke, 512, max_num_seqs=8) == CPU_KV_CACHE_FLOOR
    # A large model: capped, unless two full-length sequences need more (vLLM refuses less than one).
    assert cpu_kv_cache_bytes(LLAMA_8B, 4096) == CPU_KV_CACHE_CAP
    assert cpu_kv_cache_bytes(LLAMA_8B, 32768) == 2 * (128 << 10) * 32768 == 8 * GiB


def test_unreadable_config_is_none(tmp_path):
    assert engines._model_config(str(tmp_path / "missing"), None) is None


class _FakeLLM:
    """Stands in for vllm.LLM: records its arguments, keeps the KV size in its config as vLLM does."""

    last: dict[str, Any] = {}

    def __init__(self, **kwargs: Any):
        _FakeLLM.last = kwargs
        cache = types.SimpleNamespace(kv_cache_memory_bytes=kwargs.get("kv_cache_memory_bytes"))
        self.llm_engine = types.SimpleNamespace(vllm_config=types.SimpleNamespace(cache_config=cache))

    def get_tokenizer(self) -> None:
        return None


@pytest.fixture
def fake_vllm(monkeypatch):
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # VLLMEngine sets it; restored afterwards
    platform = types.SimpleNamespace(is_cpu=lambda: True)
    monkeypatch.setitem(sys.modules, "vllm", types.SimpleNamespace(LLM=_FakeLLM))
    monkeypatch.setitem(sys.modules, "vllm.platforms", types.SimpleNamespace(current_platform=platform))
    return platform


@pytest.mark.parametrize("bf16", [True, False])
def test_engine_passes_and_records_the_kv_size(tmp_path, fake_vllm, monkeypatch, bf16):
    config_file(tmp_path, SMOKE)
    monkeypatch.setattr(engines, "cpu_has_bf16", lambda: bf16)
    engine = engines.VLLMEngine(str(tmp_path), "r1", max_model_len=2048, max_num_seqs=128)
    # A CPU without bf16 runs float32, whose KV cache is twice the size.
    assert _FakeLLM.last["dtype"] == ("auto" if bf16 else "float32")
    want = (512 << 20) * (1 if bf16 else 2)
    assert _FakeLLM.last["kv_cache_memory_bytes"] == want == engine.info.options["cpu_kv_cache_bytes"]
    assert _FakeLLM.last["max_num_seqs"] == 128
    # An explicit size wins over the need.
    engine = engines.VLLMEngine(str(tmp_path), "r1", max_model_len=2048, cpu_kv_cache_gb=1.5)
    assert engine.info.options["cpu_kv_cache_bytes"] == int(1.5 * GiB)
    # On a GPU vLLM's own gpu_memory_utilization applies, untouched.
    fake_vllm.is_cpu = lambda: False
    engine = engines.VLLMEngine(str(tmp_path), "r1", max_model_len=2048, gpu_memory_utilization=0.9)
    assert "kv_cache_memory_bytes" not in _FakeLLM.last and _FakeLLM.last["gpu_memory_utilization"] == 0.9
    assert "cpu_kv_cache_bytes" not in engine.info.options


def test_resource_reads_the_kv_size_from_the_environment_when_it_runs(monkeypatch):
    from pydantic import ValidationError

    from fineinstructions_dagster.defs import resources
    from fineinstructions_dagster.defs.resources import LLMResource, build_resources

    seen = []
    monkeypatch.setattr(resources, "get_engine", lambda backend, model, rev, **kw: seen.append((backend, model, kw)))
    judge = build_resources()["judge_llm"]  # built before the variable is set: read when the engine starts
    monkeypatch.setenv("FINEINSTRUCTIONS_CPU_KV_CACHE_GB", "1.5")
    monkeypatch.setenv("FINEINSTRUCTIONS_JUDGE_MODEL", "/models/judge")
    judge.model_copy(update={"backend": "vllm"}).engine()
    assert seen[-1][:2] == ("vllm", "/models/judge") and seen[-1][2]["cpu_kv_cache_gb"] == 1.5
    monkeypatch.delenv("FINEINSTRUCTIONS_CPU_KV_CACHE_GB")
    LLMResource(role="judge", backend="vllm").engine()
    assert seen[-1][2]["cpu_kv_cache_gb"] == 0.0
    LLMResource(role="judge", backend="vllm", cpu_kv_cache_gb=2.0).engine()  # configured wins
    assert seen[-1][2]["cpu_kv_cache_gb"] == 2.0
    with pytest.raises(ValidationError):
        LLMResource(model="m", cpu_kv_cache_gb=-1)


# One `fineinstructions run`'s engine: start, generate a few structured requests, report time and memory.
CHILD = r"""
import json, resource, sys, time
t0 = time.monotonic()
from fineinstructions_dagster.llm.engines import GenerationRequest, SamplingConfig, VLLMEngine
from fineinstructions_dagster.prompts import judge
engine = VLLMEngine(sys.argv[1], max_model_len=2048)
start_s = time.monotonic() - t0
out = engine.generate([GenerationRequest(judge.messages(f"document {i} " * 50, "What?", "That."),
                                         SamplingConfig(max_tokens=80, temperature=1.0), seed=i,
                                         json_schema=judge.schema(60)) for i in range(4)])
peak_rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024
print(json.dumps({"start_s": round(start_s, 1), "peak_rss_mb": peak_rss_mb,
                  "kv_bytes": engine.info.options["cpu_kv_cache_bytes"],
                  "scores": [json.loads(r.text, strict=False)["score"] for r in out]}))
engine.close()
"""


def _vllm_on_cpu() -> bool:
    if not vllm_available():
        return False
    from vllm.platforms import current_platform

    return current_platform.is_cpu()


@pytest.mark.vllm
@pytest.mark.slow  # two engines in processes of their own
@pytest.mark.skipif(not _vllm_on_cpu(), reason="needs vllm on CPU (install the cpu extra)")
def test_two_vllm_processes_share_one_machine(smoke_model):
    procs = [subprocess.Popen([sys.executable, "-c", CHILD, str(smoke_model)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    reports = []
    for p in procs:
        out, err = p.communicate(timeout=900)
        assert p.returncode == 0, err[-3000:]
        reports.append(json.loads(out.strip().splitlines()[-1]))
    print("two vLLM processes side by side:", reports)
    expected = cpu_kv_cache_bytes(json.loads((smoke_model / "config.json").read_text()), 2048,
                                  dtype=engines.engine_dtype("auto", on_cpu=True))
    for r in reports:
        assert r["kv_bytes"] == expected
        assert all(1 <= s <= 5 for s in r["scores"])
