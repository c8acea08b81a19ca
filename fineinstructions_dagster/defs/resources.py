"""Resources. Nothing is read from the environment when the code location loads: a field left empty is resolved
when a run (or the command-line runner) uses it, from the one mapping of variables below (`setting`)."""

from __future__ import annotations

import os
from pathlib import Path

from dagster import ConfigurableResource, Definitions, InitResourceContext, definitions, in_process_executor
from pydantic import Field

from fineinstructions_dagster.config import PAPER_MODELS, PipelineConfig, profile_config
from fineinstructions_dagster.lib.process import die_with_parent
from fineinstructions_dagster.lib.storage import TableStore, make_s3_client
from fineinstructions_dagster.llm.cache import GenerationCache
from fineinstructions_dagster.llm.engines import LLMEngine, get_engine, release_engines, resolve_revision
from fineinstructions_dagster.stages.embedding import Embedder, get_embedder
from fineinstructions_dagster.stages.relevance import RelevanceScorer, get_relevance_scorer

DEFAULT_SMOKE_MODEL = "models/smoke"
DEFAULT_PACKAGED_MODEL = "models/smollm2-135m-instruct"  # built by scripts/setup.sh (llm/packaged.py)
ROLES = ("genericizer", "instantiator", "judge")

# Every environment variable the platform reads, with its default: the one place they are named.
ENV_DEFAULTS = {
    "FINEINSTRUCTIONS_ROOT": "data",
    "FINEINSTRUCTIONS_CACHE_DIR": "",
    "FINEINSTRUCTIONS_QUERIES": "data/inputs/queries",
    "FINEINSTRUCTIONS_CORPUS": "data/inputs/corpus",
    "FINEINSTRUCTIONS_BENCHMARKS": "",  # empty: the builtin benchmarks only (PipelineConfig.decontamination)
    "FINEINSTRUCTIONS_PROFILE": "paper",
    "FINEINSTRUCTIONS_LLM_BACKEND": "auto",
    "FINEINSTRUCTIONS_OPENAI_BASE_URL": "",
    **{f"FINEINSTRUCTIONS_{r.upper()}_BASE_URL": "" for r in ROLES},
    **{f"FINEINSTRUCTIONS_{r.upper()}_MODEL": "" for r in ROLES},  # empty: by profile (smoke / paper models)
    "FINEINSTRUCTIONS_SMOKE_MODEL": DEFAULT_SMOKE_MODEL,
    "FINEINSTRUCTIONS_PACKAGED_MODEL": DEFAULT_PACKAGED_MODEL,
    "FINEINSTRUCTIONS_EMBEDDER_MODEL": "",
    # the relevance signal's model (empty: the embedder's) and kind (auto | bi-encoder | cross-encoder)
    "FINEINSTRUCTIONS_RELEVANCE_MODEL": "",
    "FINEINSTRUCTIONS_RELEVANCE_KIND": "auto",
    "FINEINSTRUCTIONS_CPU_KV_CACHE_GB": "0",
    # 1: LLM output that two fresh runs reproduce, at a cost (vLLM one sequence at a time; benchmarks/determinism.py)
    "FINEINSTRUCTIONS_DETERMINISTIC": "0",
    "FINEINSTRUCTIONS_GPU_MEMORY_UTILIZATION": "0.3",
    # where the explorer and the Dagster UI are, for the links each shows to the other
    "FINEINSTRUCTIONS_EXPLORE_URL": "http://127.0.0.1:8080",
    "FINEINSTRUCTIONS_DAGSTER_URL": "http://127.0.0.1:3000",  # vLLM on GPU: the share of GPU memory it reserves
    # the scheduled backfill (stopped by default): when it backfills what is new or stale
    "FINEINSTRUCTIONS_BACKFILL_CRON": "0 2 * * *",
    "FINEINSTRUCTIONS_BACKFILL_TIMEZONE": "UTC",
    "AWS_ENDPOINT_URL": "",  # an S3-compatible store (MinIO, moto); empty: AWS
    "AWS_REGION": "",
}


def setting(name: str, configured: str | None = None) -> str:
    """A value configured on the resource (launchpad, code) wins; else the variable's value now; else its
    default."""
    return configured or os.environ.get(name) or ENV_DEFAULTS[name]


def env_value(name: str) -> str:
    """The variable's value now, or its default (code outside a run, e.g. the command-line runner)."""
    return setting(name)


class StorageResource(ConfigurableResource):
    """Storage root for every table (`FINEINSTRUCTIONS_ROOT`, default ./data; `s3://bucket/prefix` in
    production, through the platform's one S3 client (lib/storage.make_s3_client, boto3, as for the inputs and
    the index): endpoint (AWS_ENDPOINT_URL, e.g. MinIO) and region (AWS_REGION) here, credentials from boto3's
    usual chain). `cache_dir`: where an S3 root's local working copy lives (FINEINSTRUCTIONS_CACHE_DIR)."""

    root: str = ""
    cache_dir: str = ""
    s3_endpoint_url: str = ""
    s3_region: str = ""
    s3_max_attempts: int = 5

    def store(self) -> TableStore:
        root = setting("FINEINSTRUCTIONS_ROOT", self.root)
        if not root.startswith("s3://"):
            return TableStore(root)
        client = make_s3_client(setting("AWS_ENDPOINT_URL", self.s3_endpoint_url),
                                setting("AWS_REGION", self.s3_region), self.s3_max_attempts)
        return TableStore(root, s3_client=client,
                          working_copy=setting("FINEINSTRUCTIONS_CACHE_DIR", self.cache_dir) or None)

    def generation_cache(self) -> GenerationCache:
        return GenerationCache(Path(self.store().root) / "_cache" / "generations.sqlite")


class InputsResource(ConfigurableResource):
    """Where new inputs arrive: one query source per file/subfolder, one corpus shard per file; and the benchmark
    files (one benchmark per file or subfolder) that decontamination checks against besides the builtin ones."""

    queries_dir: str = ""
    corpus_dir: str = ""
    benchmarks_dir: str = ""

    def queries(self) -> str:
        return setting("FINEINSTRUCTIONS_QUERIES", self.queries_dir)

    def corpus(self) -> str:
        return setting("FINEINSTRUCTIONS_CORPUS", self.corpus_dir)

    def benchmarks(self) -> str:
        """The benchmark folder; empty: the builtin benchmarks only."""
        return setting("FINEINSTRUCTIONS_BENCHMARKS", self.benchmarks_dir)


def default_model(role: str, profile: str) -> str:
    """A role's model when none is named: the profile's (smoke model, packaged model, paper model)."""
    if profile == "smoke":
        return setting("FINEINSTRUCTIONS_SMOKE_MODEL")
    if profile == "demo":
        return setting("FINEINSTRUCTIONS_PACKAGED_MODEL")
    return PAPER_MODELS[role]


class LLMResource(ConfigurableResource):
    """One generative model role. backend: vllm | openai | transformers | auto (vllm if installed).

    Empty fields are resolved when the step runs: `model` from FINEINSTRUCTIONS_<ROLE>_MODEL, else the smoke
    model (smoke profile), the packaged model (demo profile) or the role's paper model; `base_url` from
    FINEINSTRUCTIONS_<ROLE>_BASE_URL, else FINEINSTRUCTIONS_OPENAI_BASE_URL (one vLLM server serves one model);
    `backend` from
    FINEINSTRUCTIONS_LLM_BACKEND. The engine lives as long as the run's execution: set up lazily on first
    use, shut down when the execution ends (success, failure or Terminate). Steps run in the run worker's
    process (the location's executor), so a killed run leaves no model in memory; under a multiprocess executor
    each step process dies with its run worker. `vllm_multiprocessing`: vLLM's engine core in its own
    process (large GPU hosts) instead of in the run's (default). `cpu_kv_cache_gb`: vLLM's KV cache on
    CPU (FINEINSTRUCTIONS_CPU_KV_CACHE_GB when unset); 0 sizes it from the model and batch, not as a share of
    the machine's RAM. On GPU, `gpu_memory_utilization` applies (FINEINSTRUCTIONS_GPU_MEMORY_UTILIZATION when
    unset, default 0.3)."""

    role: str = "instantiator"
    backend: str = ""
    model: str = ""
    revision: str = ""
    base_url: str = ""  # openai backend: e.g. http://127.0.0.1:8000/v1
    max_model_len: int = 4096
    gpu_memory_utilization: float | None = Field(default=None, gt=0.0, le=1.0)
    enforce_eager: bool = True
    batch_size: int = 16  # transformers backend
    concurrency: int = 16  # openai backend
    vllm_multiprocessing: bool = False
    cpu_kv_cache_gb: float | None = Field(default=None, ge=0.0)
    # None: FINEINSTRUCTIONS_DETERMINISTIC. vLLM's scheduler batches whatever is queued, and a prompt's greedy
    # output depends on the batch it ran in (bench-determinism: 57% of the genericizer's outputs the same in two
    # fresh runs); one sequence at a time reproduces them all, about 5x slower. Transformers batches are fixed.
    deterministic: bool | None = None

    def setup_for_execution(self, context: InitResourceContext) -> None:
        die_with_parent()

    def teardown_after_execution(self, context: InitResourceContext) -> None:
        release_engines()

    def model_name(self) -> str:
        own = f"FINEINSTRUCTIONS_{self.role.upper()}_MODEL"
        if self.model or os.environ.get(own):
            return setting(own, self.model)
        return default_model(self.role, setting("FINEINSTRUCTIONS_PROFILE"))

    def runs_deterministic(self) -> bool:
        if self.deterministic is not None:
            return self.deterministic
        return setting("FINEINSTRUCTIONS_DETERMINISTIC").lower() in ("1", "true", "yes")

    def identity(self) -> dict[str, str | bool]:
        """What this role runs, without loading it: the backend as configured, the model and the revision its
        engine records (a local folder's hash, a Hub snapshot, or the server's), and whether it was asked to run
        deterministically."""
        backend, model = setting("FINEINSTRUCTIONS_LLM_BACKEND", self.backend), self.model_name()
        if backend == "openai":
            return {"backend": backend, "model": model, "revision": self.revision or "server"}
        revision = resolve_revision(model, self.revision or None)
        return {"backend": backend, "model": model, "revision": revision, "deterministic": self.runs_deterministic()}

    def engine(self) -> LLMEngine:
        backend = setting("FINEINSTRUCTIONS_LLM_BACKEND", self.backend)
        model, revision = self.model_name(), self.revision or None
        if backend == "openai":
            base_url = (setting(f"FINEINSTRUCTIONS_{self.role.upper()}_BASE_URL", self.base_url)
                        or setting("FINEINSTRUCTIONS_OPENAI_BASE_URL"))
            if not base_url:
                raise ValueError("LLM backend 'openai' needs base_url (FINEINSTRUCTIONS_OPENAI_BASE_URL)")
            return get_engine("openai", model, revision, base_url=base_url, concurrency=self.concurrency)
        if backend == "auto":
            from fineinstructions_dagster.llm.engines import vllm_available

            backend = "vllm" if vllm_available() else "transformers"
        if backend == "vllm":
            kv_gb = (self.cpu_kv_cache_gb if self.cpu_kv_cache_gb is not None
                     else float(setting("FINEINSTRUCTIONS_CPU_KV_CACHE_GB")))
            one_at_a_time = {"max_num_seqs": 1} if self.runs_deterministic() else {}
            return get_engine("vllm", model, revision, max_model_len=self.max_model_len, **one_at_a_time,
                              gpu_memory_utilization=(self.gpu_memory_utilization if self.gpu_memory_utilization
                                                      else float(setting("FINEINSTRUCTIONS_GPU_MEMORY_UTILIZATION"))),
                              enforce_eager=self.enforce_eager, multiprocessing=self.vllm_multiprocessing,
                              cpu_kv_cache_gb=kv_gb)
        return get_engine(backend, model, revision, batch_size=self.batch_size, max_model_len=self.max_model_len)


class EmbedderResource(ConfigurableResource):
    """Sentence-transformers model for templates and documents (default: packaged all-MiniLM-L6-v2)."""

    model: str = ""
    batch_size: int = 64
    device: str = "cpu"

    def embedder(self) -> Embedder:
        return get_embedder(setting("FINEINSTRUCTIONS_EMBEDDER_MODEL", self.model), self.batch_size, self.device)

    def identity(self) -> dict[str, str]:
        """The model's name and revision (its weights are loaded on first use, not here)."""
        emb = self.embedder()
        return {"model": emb.name, "revision": emb.revision}


class RelevanceResource(ConfigurableResource):
    """The model that scores how well an answer answers its instruction (the `relevance` gate and the control
    pairs' relevance): FINEINSTRUCTIONS_RELEVANCE_MODEL, else the packaged all-MiniLM-L6-v2 (a bi-encoder: cosine),
    whatever embedder matching uses; a CrossEncoder reranker for production (`kind` cross-encoder, or auto from its
    config). Its threshold is PipelineConfig.min_relevance, measured for the default model: set both together."""

    model: str = ""
    kind: str = ""
    batch_size: int = 64
    device: str = "cpu"

    def scorer(self) -> RelevanceScorer:
        # Not the matching embedder's model by default: min_relevance is measured for the packaged MiniLM.
        model = setting("FINEINSTRUCTIONS_RELEVANCE_MODEL", self.model)
        return get_relevance_scorer(model, setting("FINEINSTRUCTIONS_RELEVANCE_KIND", self.kind), self.batch_size,
                                    self.device)

    def identity(self) -> dict[str, str]:
        """The scorer's name (model and kind) and revision (its weights are loaded on first use, not here)."""
        scorer = self.scorer()
        return {"model": scorer.name, "revision": scorer.revision}


class PipelineResource(ConfigurableResource):
    """Thresholds and k. `profile`: paper (default), demo (the packaged small model) or smoke (smoke models)."""

    profile: str = ""  # empty: FINEINSTRUCTIONS_PROFILE, else paper
    templates_per_document: int | None = None
    judge_threshold: int | None = None
    min_grounding: float | None = None
    min_relevance: float | None = None
    min_relevance_margin: float | None = None
    min_fill_in_document: float | None = None
    min_fill_in_answer: float | None = None
    min_match_score: float | None = None
    control_share: float | None = None
    max_control_kept_share: float | None = None
    control_check_blocks: bool | None = None
    extract_answer: str | None = None
    chunk_rows: int | None = None
    max_pairs_per_document: int | None = None
    max_pair_token_ratio: float | None = None
    max_template_share_per_shard: float | None = None

    def config(self) -> PipelineConfig:
        return profile_config(setting("FINEINSTRUCTIONS_PROFILE", self.profile),
                              templates_per_document=self.templates_per_document,
                              judge_threshold=self.judge_threshold, min_grounding=self.min_grounding,
                              min_relevance=self.min_relevance, min_relevance_margin=self.min_relevance_margin,
                              min_fill_in_document=self.min_fill_in_document,
                              min_fill_in_answer=self.min_fill_in_answer,
                              min_match_score=self.min_match_score,
                              control_share=self.control_share, max_control_kept_share=self.max_control_kept_share,
                              control_check_blocks=self.control_check_blocks, extract_answer=self.extract_answer,
                              chunk_rows=self.chunk_rows, max_pairs_per_document=self.max_pairs_per_document,
                              max_pair_token_ratio=self.max_pair_token_ratio,
                              max_template_share_per_shard=self.max_template_share_per_shard)


def build_resources() -> dict[str, ConfigurableResource]:
    """The code location's resources: every setting left to `setting` at run time, so one code location serves
    any environment (local folders, an S3 bucket, model servers) without reading it at import."""
    return {
        "storage": StorageResource(),
        "inputs": InputsResource(),
        **{f"{role}_llm": LLMResource(role=role) for role in ROLES},
        "embedder": EmbedderResource(),
        "relevance": RelevanceResource(),
        "pipeline": PipelineResource(),
    }


@definitions
def resources() -> Definitions:
    """The resources every asset, sensor and job of the location is bound to (the defs folder's loader merges
    them with each domain's definitions), and the executor of its runs: every step of a run in the run's own
    process. A run's steps are a chain over the same partitions, so a process per step (Dagster's default) runs
    nothing in parallel and costs each step a fresh import of the location (~10 s on 2 cores) and its models'
    loads; the engines live for the run, as under `fineinstructions run`, and die with its process."""
    return Definitions(resources=build_resources(), executor=in_process_executor)
