"""Real engines on the smoke model: structured output makes noise parse."""

import json
from dataclasses import replace

import pytest

from fineinstructions_dagster.llm.engines import (
    GenerationRequest,
    SamplingConfig,
    get_engine,
    runs_deterministically,
    vllm_available,
)
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
    query = "How do I sort a list?"
    templates = engine.generate([GenerationRequest(genericize.messages(query),
                                                   SamplingConfig(max_tokens=120, temperature=1.0), seed=1,
                                                   json_schema=genericize.schema(query, 160, 80))])
    # the schema holds even a random model to a phrase of the query
    assert json.loads(templates[0].text, strict=False)["specific"] in genericize.slot_candidates(query)


@pytest.mark.vllm
@pytest.mark.skipif(not vllm_available(), reason="vllm is not installed (install the cpu or gpu extra)")
def test_vllm_engine_structured_output(smoke_model):
    engine = get_engine("vllm", str(smoke_model), max_model_len=2048, gpu_memory_utilization=0.3)
    assert engine.info.backend == "vllm"
    check_outputs(engine.generate(requests(16)))
    # the loaded engine compiles grammars in step (this vLLM still has the flag), so its runs are deterministic
    assert engine.info.options["grammar_compilation"] == "sync" and runs_deterministically(engine.info)


def test_openai_engine_retries_then_reports_failure():
    engine = get_engine("openai", "m", base_url="http://127.0.0.1:9/v1", max_retries=1, timeout_s=2.0)
    out = engine.generate(requests(1))
    assert out[0].error and "request failed" in out[0].error and out[0].text == ""


class _FakeServer:
    """A tiny OpenAI-compatible endpoint on 127.0.0.1: answers with `replies` in turn (status, body) and
    records every request body."""

    def __init__(self, replies: list[tuple[int, dict]]):
        import http.server
        import threading

        self.replies, self.bodies = list(replies), []
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (the stdlib's name)
                server.bodies.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
                status, body = server.replies.pop(0) if server.replies else (500, {"error": "no reply left"})
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: object) -> None:
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()


COMPLETION = {"id": "c1", "object": "chat.completion", "created": 0, "model": "m",
              "choices": [{"index": 0, "finish_reason": "stop",
                           "message": {"role": "assistant", "content": '{"template": "How do I <fi>x</fi>?"}'}}],
              "usage": {"prompt_tokens": 12, "completion_tokens": 7, "total_tokens": 19}}


def test_openai_engine_retries_a_busy_server_and_sends_the_schema():
    from fineinstructions_dagster.llm.engines import OpenAIEngine

    server = _FakeServer([(503, {"error": "busy"}), (200, COMPLETION)])
    try:
        engine = OpenAIEngine("m", base_url=server.url, max_retries=2, timeout_s=5.0)
        (out,) = engine.generate([GenerationRequest(genericize.messages("How do I sort a list?"),
                                                    SamplingConfig(max_tokens=50, temperature=0.0), seed=3,
                                                    json_schema={"type": "object"})])
    finally:
        server.close()
    assert out.error is None and out.text == COMPLETION["choices"][0]["message"]["content"]
    assert (out.prompt_tokens, out.completion_tokens, out.finish_reason) == (12, 7, "stop")
    assert len(server.bodies) == 2  # the 503 was retried once
    body = server.bodies[-1]
    assert body["response_format"]["json_schema"]["schema"] == {"type": "object"}
    assert (body["max_tokens"], body["seed"], body["temperature"]) == (50, 3, 0.0)


def test_openai_engine_does_not_retry_a_client_error():
    from fineinstructions_dagster.llm.engines import OpenAIEngine

    server = _FakeServer([(400, {"error": {"message": "bad schema"}}), (200, COMPLETION)])
    try:
        (out,) = OpenAIEngine("m", base_url=server.url, max_retries=3, timeout_s=5.0).generate(requests(1))
    finally:
        server.close()
    assert out.text == "" and "HTTP 400" in out.error and len(server.bodies) == 1


def test_sampling_records_a_repetition_penalty_and_stops_only_when_set():
    # keys of generations made before these parameters existed stay valid
    assert SamplingConfig(max_tokens=8).as_dict() == {"max_tokens": 8, "temperature": 0.0, "top_p": 1.0}
    both = SamplingConfig(max_tokens=8, repetition_penalty=1.2, stop=("\n\n",)).as_dict()
    assert both["repetition_penalty"] == 1.2 and both["stop"] == ["\n\n"]
    with pytest.raises(ValueError, match="repetition_penalty"):
        SamplingConfig(repetition_penalty=0.5)


def test_transformers_engine_applies_a_stop_string(smoke_model):
    engine = get_engine("transformers", str(smoke_model), batch_size=2)
    noisy = SamplingConfig(max_tokens=40, temperature=1.0)
    free = engine.generate([GenerationRequest((("user", "hi"),), noisy, seed=1)])[0]
    assert len(free.text) > 20, free.text
    stop = free.text[12:15]
    cut = engine.generate([GenerationRequest((("user", "hi"),), replace(noisy, stop=(stop,)), seed=1)])[0]
    # the same seed writes the same text up to the stop string, which is left out (as vLLM does)
    assert cut.text == free.text[:free.text.find(stop)] and cut.finish_reason == "stop"
