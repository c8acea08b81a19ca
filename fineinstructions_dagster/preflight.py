"""Checks a run's set-up in seconds, before any work: the input folders exist and hold inputs, the profile is
valid, every model resolves (offline unless downloads are allowed), naming the model and the variable that set
it, and the vLLM engine fits in the memory there is (CPU hosts). One line per problem; the command-line runner
prints them and stops."""

from __future__ import annotations

import os
from pathlib import Path

GiB = 1 << 30
RUNTIME_OVERHEAD = GiB  # Python, torch and vLLM themselves, measured ~0.9 GiB RSS before weights on this CPU host


def _vllm_on_cpu() -> bool:
    from fineinstructions_dagster.defs.resources import env_value
    from fineinstructions_dagster.llm.engines import vllm_available

    backend = env_value("FINEINSTRUCTIONS_LLM_BACKEND")
    return (backend == "vllm" or (backend == "auto" and vllm_available())) and not Path("/dev/nvidia0").exists()


def engine_memory_bytes(model: str, max_model_len: int = 4096) -> int | None:
    """RAM an in-process vLLM engine on CPU takes for a local model: its weight files, the KV cache it will be
    given (FINEINSTRUCTIONS_CPU_KV_CACHE_GB, else sized from the model's config) and the runtime. None where it
    cannot be told (a GPU host, another backend, a Hub model not on disk)."""
    import json

    from fineinstructions_dagster.defs.resources import env_value
    from fineinstructions_dagster.llm.engines import cpu_kv_cache_bytes

    folder = Path(model)
    if not (folder / "config.json").is_file() or not _vllm_on_cpu():
        return None
    weights = sum(f.stat().st_size for f in folder.glob("*.safetensors")) or \
        sum(f.stat().st_size for f in folder.glob("*.bin"))
    kv_gb = float(env_value("FINEINSTRUCTIONS_CPU_KV_CACHE_GB") or 0)
    kv = int(kv_gb * GiB) if kv_gb > 0 else cpu_kv_cache_bytes(json.loads((folder / "config.json").read_text()),
                                                                max_model_len)
    return weights + kv + RUNTIME_OVERHEAD


def available_memory_bytes() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def memory_problem(need: int, model: str) -> str | None:
    """A line when the engine would not fit in the memory available now (one engine runs at a time: the largest)."""
    free = available_memory_bytes()
    if free is None or need <= free:
        return None
    return (f"the vLLM engine for {model!r} needs about {need / GiB:.1f} GiB (weights, KV cache, runtime) and "
            f"{free / GiB:.1f} GiB is available: free memory, or give the KV cache less with "
            "FINEINSTRUCTIONS_CPU_KV_CACHE_GB")


def _model_resolves(name: str, offline: bool) -> str | None:
    """None when the model can be loaded: a local folder with a config, or a Hub id in the local cache (or any
    Hub id when downloads are allowed); else why not."""
    path = Path(name)
    if path.exists() or name.startswith((".", "/", "~")):
        if not path.is_dir():
            return "no such folder"
        if not (path / "config.json").exists():
            return "the folder has no config.json (not a Hugging Face model folder)"
        return None
    if not offline:
        return None
    try:
        from huggingface_hub import snapshot_download

        snapshot_download(name, local_files_only=True)
    except Exception:  # noqa: BLE001 - any failure means: not in the local cache
        return ("not in the local Hugging Face cache and downloads are off (fineinstructions run --online, or "
                "FINEINSTRUCTIONS_ALLOW_DOWNLOADS=1)")
    return None


def problems() -> list[str]:
    """Every problem found with the current settings (environment), one line each; empty when a run can start."""
    from fineinstructions_dagster.config import PROFILES, profile_config
    from fineinstructions_dagster.defs.inputs import benchmark_sources, corpus_shards, folder_exists, query_sources
    from fineinstructions_dagster.defs.resources import ROLES, LLMResource, env_value

    out: list[str] = []
    for var, what, discover in (("FINEINSTRUCTIONS_QUERIES", "query", query_sources),
                                ("FINEINSTRUCTIONS_CORPUS", "corpus shard", corpus_shards)):
        folder = env_value(var)
        try:
            if not folder_exists(folder):
                out.append(f"{var}: the {what} folder {folder} does not exist")
            elif not discover(folder):
                out.append(f"{var}: no {what} files in {folder} (readable: .parquet, .jsonl[.gz|.zst], .json, "
                           ".ndjson)")
        except Exception as e:  # noqa: BLE001 - e.g. no S3 credentials: said, not raised
            out.append(f"{var}: cannot list {folder}: {type(e).__name__}: {e}")
    benchmarks = env_value("FINEINSTRUCTIONS_BENCHMARKS")  # optional: empty is the builtin HumanEval only
    if benchmarks:
        try:
            if not folder_exists(benchmarks):
                out.append(f"FINEINSTRUCTIONS_BENCHMARKS: the benchmark folder {benchmarks} does not exist")
            elif not benchmark_sources(benchmarks, ())[0]:
                out.append(f"FINEINSTRUCTIONS_BENCHMARKS: no benchmark files in {benchmarks} (readable: .jsonl[.gz], "
                           ".json[.gz], .ndjson, .parquet, .arrow)")
        except Exception as e:  # noqa: BLE001 - said, not raised
            out.append(f"FINEINSTRUCTIONS_BENCHMARKS: cannot list {benchmarks}: {type(e).__name__}: {e}")
    profile = env_value("FINEINSTRUCTIONS_PROFILE")
    try:
        profile_config(profile)
    except Exception as e:  # noqa: BLE001 - the profile's own validation names the field
        out.append(f"FINEINSTRUCTIONS_PROFILE={profile!r}: {e} (profiles: {', '.join(PROFILES)})")
        return out
    offline = os.environ.get("HF_HUB_OFFLINE") == "1"
    if env_value("FINEINSTRUCTIONS_LLM_BACKEND") != "openai":  # a server loads its own models
        largest: tuple[int, str] | None = None
        for role in ROLES:
            var = f"FINEINSTRUCTIONS_{role.upper()}_MODEL"
            model = LLMResource(role=role).model_name()
            why = _model_resolves(model, offline)
            if why:
                source = (f"set by {var}" if os.environ.get(var) else
                          "the smoke model of the smoke profile (FINEINSTRUCTIONS_SMOKE_MODEL; `make smoke-models`)"
                          if profile == "smoke" else
                          "the packaged model of the demo profile (FINEINSTRUCTIONS_PACKAGED_MODEL; `make setup` "
                          "builds it)" if profile == "demo" else f"the paper's default; set {var} to use another")
                out.append(f"{role} model {model!r} ({source}): {why}")
            else:
                need = engine_memory_bytes(model)
                if need is not None and (largest is None or need > largest[0]):
                    largest = (need, model)
        if largest is not None and (problem := memory_problem(*largest)):
            out.append(problem)
    for role in ("EMBEDDER", "RELEVANCE"):
        model = env_value(f"FINEINSTRUCTIONS_{role}_MODEL")
        if model and (why := _model_resolves(model, offline)):
            out.append(f"{role.lower()} model {model!r} (set by FINEINSTRUCTIONS_{role}_MODEL): {why}")
    return out
