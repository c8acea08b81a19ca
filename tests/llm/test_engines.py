"""Real engines on the smoke model: structured output makes noise parse."""

import json

import pytest

from fineinstructions_dagster.llm.engines import GenerationRequest, SamplingConfig, get_engine, vllm_available
from fineinstructions_dagster.prompts import genericize, judge

SCHEMA = judge.schema(60)


def requests(n):
    return [GenerationRequest(judge.messages(f"document {i} " * 50, "What?", "That."),
                              SamplingConfig(max_tokens=80, temperature=1.0), seed=i, json_schema=SCHEMA)
            for i in range(n)]


def check_outputs(results):
    for r in results:
        obj = json.loads(r.text, strict=False)
        assert 1 <= obj["score"] <= 5
        assert r.completion_tokens > 0 and r.prompt.startswith("<|bos|>")


def test_transformers_engine_structured_output(smoke_model):
    engine = get_engine("transformers", str(smoke_model), batch_size=4)
    assert engine.info.revision.startswith("smoke-")
    results = engine.generate(requests(6))
    check_outputs(results)
    templates = engine.generate([GenerationRequest(genericize.messages("How do I sort a list?"),
                                                   SamplingConfig(max_tokens=120, temperature=1.0), seed=1,
                                                   json_schema=genericize.schema(160, 80))])
    assert "<fi>" in json.loads(templates[0].text, strict=False)["template"]


@pytest.mark.vllm
@pytest.mark.skipif(not vllm_available(), reason="vllm is not installed (install the cpu or gpu extra)")
def test_vllm_engine_structured_output(smoke_model):
    engine = get_engine("vllm", str(smoke_model), max_model_len=2048, gpu_memory_utilization=0.3)
    assert engine.info.backend == "vllm"
    check_outputs(engine.generate(requests(16)))


def test_openai_engine_retries_then_reports_failure():
    engine = get_engine("openai", "m", base_url="http://127.0.0.1:9/v1", max_retries=1, timeout_s=2.0)
    out = engine.generate(requests(1))
    assert out[0].error and "request failed" in out[0].error and out[0].text == ""
