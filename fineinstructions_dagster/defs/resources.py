"""Resources, configured in one place from the environment (EnvVar where a variable is set)."""

from __future__ import annotations

import os
from pathlib import Path

from dagster import ConfigurableResource, EnvVar, InitResourceContext
from dagster_aws.s3.utils import construct_s3_client
from pydantic import Field

from fineinstructions_dagster.config import PAPER_MODELS, PipelineConfig, profile_config
from fineinstructions_dagster.lib.process import die_with_parent
from fineinstructions_dagster.lib.storage import TableStore
from fineinstructions_dagster.llm.cache import GenerationCache
from fineinstructions_dagster.llm.engines import LLMEngine, get_engine, release_engines
from fineinstructions_dagster.stages.embedding import Embedder, get_embedder

DEFAULT_SMOKE_MODEL = "models/smoke"


class StorageResource(ConfigurableResource):
    """Storage root for every table (`FINEINSTRUCTIONS_ROOT`, default ./data; `s3://bucket/prefix` in
    production, with dagster-aws's S3 client: endpoint (AWS_ENDPOINT_URL, e.g. MinIO) and region (AWS_REGION)
    here, credentials from boto3's usual chain). `cache_dir`: where an S3 root's local working copy lives
    (FINEINSTRUCTIONS_CACHE_DIR)."""

    root: str = "data"
    cache_dir: str = ""
    s3_endpoint_url: str = ""
    s3_region: str = ""
    s3_max_attempts: int = 5

    def store(self) -> TableStore:
        if not self.root.startswith("s3://"):
            return TableStore(self.root)
        client = construct_s3_client(self.s3_max_attempts, region_name=self.s3_region or None,
                                     endpoint_url=self.s3_endpoint_url or None)
        return TableStore(self.root, s3_client=client, working_copy=self.cache_dir or None)

    def generation_cache(self) -> GenerationCache:
        return GenerationCache(Path(self.store().root) / "_cache" / "generations.sqlite")


class InputsResource(ConfigurableResource):
    """Where new inputs arrive: one query source per file/subfolder, one corpus shard per file."""

    queries_dir: str = "data/inputs/queries"
    corpus_dir: str = "data/inputs/corpus"


class LLMResource(ConfigurableResource):
    """One generative model role. backend: vllm | openai | transformers | auto (vllm if installed).

    The engine lives as long as the step's execution: set up lazily on first use, shut down when the step
    ends (success, failure or Terminate), and a step process dies with its run worker, so a killed run
    leaves no model in memory. `vllm_multiprocessing`: vLLM's engine core in its own process (large GPU
    hosts) instead of in the step process (default). `cpu_kv_cache_gb`: vLLM's KV cache on CPU
    (FINEINSTRUCTIONS_CPU_KV_CACHE_GB); 0 sizes it from the model and batch, not as a share of the machine's
    RAM. On GPU, `gpu_memory_utilization` applies."""

    backend: str = "auto"
    model: str
    revision: str = ""
    base_url: str = ""  # openai backend: e.g. http://127.0.0.1:8000/v1
    max_model_len: int = 4096
    gpu_memory_utilization: float = 0.3
    enforce_eager: bool = True
    batch_size: int = 16  # transformers backend
    concurrency: int = 16  # openai backend
    vllm_multiprocessing: bool = False
    cpu_kv_cache_gb: float = Field(default=0.0, ge=0.0)

    def setup_for_execution(self, context: InitResourceContext) -> None:
        die_with_parent()

    def teardown_after_execution(self, context: InitResourceContext) -> None:
        release_engines()

    def engine(self) -> LLMEngine:
        backend = self.backend
        if backend == "openai":
            if not self.base_url:
                raise ValueError("LLM backend 'openai' needs base_url (FINEINSTRUCTIONS_OPENAI_BASE_URL)")
            return get_engine("openai", self.model, self.revision or None, base_url=self.base_url,
                              concurrency=self.concurrency)
        if backend == "auto":
            from fineinstructions_dagster.llm.engines import vllm_available

            backend = "vllm" if vllm_available() else "transformers"
        if backend == "vllm":
            return get_engine("vllm", self.model, self.revision or None, max_model_len=self.max_model_len,
                              gpu_memory_utilization=self.gpu_memory_utilization,
                              enforce_eager=self.enforce_eager, multiprocessing=self.vllm_multiprocessing,
                              cpu_kv_cache_gb=self.cpu_kv_cache_gb)
        return get_engine(backend, self.model, self.revision or None, batch_size=self.batch_size,
                          max_model_len=self.max_model_len)


class EmbedderResource(ConfigurableResource):
    """Sentence-transformers model for templates and documents (default: packaged all-MiniLM-L6-v2)."""

    model: str = ""
    batch_size: int = 64
    device: str = "cpu"

    def embedder(self) -> Embedder:
        return get_embedder(self.model, self.batch_size, self.device)


class PipelineResource(ConfigurableResource):
    """Thresholds and k. `profile`: paper (default) or demo (relaxed gates for smoke models)."""

    profile: str = "paper"
    templates_per_document: int | None = None
    judge_threshold: int | None = None
    min_grounding: float | None = None
    chunk_rows: int | None = None

    def config(self) -> PipelineConfig:
        return profile_config(self.profile, templates_per_document=self.templates_per_document,
                              judge_threshold=self.judge_threshold, min_grounding=self.min_grounding,
                              chunk_rows=self.chunk_rows)


# Every environment variable the platform reads, with its default: the one place they are named.
ENV_DEFAULTS = {
    "FINEINSTRUCTIONS_ROOT": "data",
    "FINEINSTRUCTIONS_CACHE_DIR": "",
    "FINEINSTRUCTIONS_QUERIES": "data/inputs/queries",
    "FINEINSTRUCTIONS_CORPUS": "data/inputs/corpus",
    "FINEINSTRUCTIONS_PROFILE": "paper",
    "FINEINSTRUCTIONS_LLM_BACKEND": "auto",
    "FINEINSTRUCTIONS_OPENAI_BASE_URL": "",
    "FINEINSTRUCTIONS_GENERICIZER_BASE_URL": "",
    "FINEINSTRUCTIONS_INSTANTIATOR_BASE_URL": "",
    "FINEINSTRUCTIONS_JUDGE_BASE_URL": "",
    "FINEINSTRUCTIONS_SMOKE_MODEL": DEFAULT_SMOKE_MODEL,
    "FINEINSTRUCTIONS_EMBEDDER_MODEL": "",
    "FINEINSTRUCTIONS_CPU_KV_CACHE_GB": "0",
}


def env_value(name: str) -> str:
    """The variable's value now (for code outside a run, e.g. the command-line runner)."""
    return os.environ.get(name) or ENV_DEFAULTS.get(name, "")


def _env(name: str, default: str | None = None) -> str | EnvVar:
    """EnvVar (resolved when a run starts) where the variable is set, else the default."""
    if os.environ.get(name):
        return EnvVar(name)
    return ENV_DEFAULTS.get(name, "") if default is None else default


def build_resources() -> dict[str, ConfigurableResource]:
    profile = env_value("FINEINSTRUCTIONS_PROFILE")
    backend = _env("FINEINSTRUCTIONS_LLM_BACKEND")
    base_url = _env("FINEINSTRUCTIONS_OPENAI_BASE_URL")
    smoke = env_value("FINEINSTRUCTIONS_SMOKE_MODEL")
    # A number: EnvVar carries only strings (and ints) into resource config, so it is read here.
    cpu_kv_cache_gb = float(env_value("FINEINSTRUCTIONS_CPU_KV_CACHE_GB"))

    def llm(role: str) -> LLMResource:
        default = smoke if profile == "demo" else PAPER_MODELS[role]
        # One vLLM server serves one model: each role may have its own (FINEINSTRUCTIONS_<ROLE>_BASE_URL).
        own_url = f"FINEINSTRUCTIONS_{role.upper()}_BASE_URL"
        return LLMResource(backend=backend, model=_env(f"FINEINSTRUCTIONS_{role.upper()}_MODEL", default),
                           base_url=EnvVar(own_url) if os.environ.get(own_url) else base_url,
                           cpu_kv_cache_gb=cpu_kv_cache_gb)

    return {
        "storage": StorageResource(
            root=_env("FINEINSTRUCTIONS_ROOT"), cache_dir=_env("FINEINSTRUCTIONS_CACHE_DIR"),
            s3_endpoint_url=_env("AWS_ENDPOINT_URL", ""), s3_region=_env("AWS_REGION", "")),
        "inputs": InputsResource(queries_dir=_env("FINEINSTRUCTIONS_QUERIES"),
                                 corpus_dir=_env("FINEINSTRUCTIONS_CORPUS")),
        "genericizer_llm": llm("genericizer"),
        "instantiator_llm": llm("instantiator"),
        "judge_llm": llm("judge"),
        "embedder": EmbedderResource(model=_env("FINEINSTRUCTIONS_EMBEDDER_MODEL")),
        "pipeline": PipelineResource(profile=profile),
    }
