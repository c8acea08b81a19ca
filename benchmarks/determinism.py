"""`make bench-determinism`: do two fresh runs of an LLM stage give the same output? The genericizer stage of the
demo (the packaged SmolLM2-135M-Instruct, the demo's greedy decoding, prompt and JSON schema) over the sample's
FAQ questions, run twice per variant, each time in a new process with a new engine and no generation cache; the
share of questions whose raw model output is the same in both (kept as a template or quarantined).

Variants: vLLM-CPU with vLLM's own default of compiling each request's JSON-schema grammar in a background thread
(a request joins the batch when its grammar is ready, so batches depend on thread timing), vLLM-CPU as the
pipeline runs it (grammars compiled as requests are added: batches follow from the requests; prefix caching on),
vLLM-CPU under FINEINSTRUCTIONS_DETERMINISTIC=1 (`max_num_seqs=1`: every prompt computed alone, whatever else is
queued), and the transformers backend (fixed batches in request order). Each row also says what the run's
metadata records (`llm_deterministic`). Prints a table, writes benchmarks/results/determinism.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO))

VARIANTS = {  # LLMResource fields, as a run sets them ("background_grammars": vLLM's default, not the pipeline's)
    "vllm, grammars compiled in the background": {"backend": "vllm", "background_grammars": True},
    "vllm (as the pipeline runs it)": {"backend": "vllm"},
    "vllm, FINEINSTRUCTIONS_DETERMINISTIC=1": {"backend": "vllm", "deterministic": True},
    "transformers (batches of 16)": {"backend": "transformers"},
}


def one_run(variant: dict, n_queries: int, out: Path) -> None:
    """In a process of its own: a fresh engine, the genericizer over the questions, outputs by query id."""
    import polars as pl

    from fineinstructions_dagster.config import profile_config
    from fineinstructions_dagster.defs.resources import LLMResource, setting
    from fineinstructions_dagster.llm import engines
    from fineinstructions_dagster.llm.cache import GenerationStats
    from fineinstructions_dagster.llm.engines import close_engines, runs_deterministically
    from fineinstructions_dagster.sample import faq_questions, find_doc_sources
    from fineinstructions_dagster.stages.llm_calls import LLMCall
    from fineinstructions_dagster.stages.templates import genericize_queries

    variant = dict(variant)
    if variant.pop("background_grammars", False):  # leave vLLM's background grammar thread on
        engines.VLLMEngine._compile_grammars_in_step = lambda self: False

    questions = faq_questions(find_doc_sources())[:n_queries]
    queries = pl.DataFrame({"query_id": [f"q{i}" for i in range(len(questions))], "source": ["faq"] * len(questions),
                            "text": [q["text"] for q in questions]})
    cfg, model = profile_config("demo"), setting("FINEINSTRUCTIONS_PACKAGED_MODEL")
    engine = LLMResource(role="genericizer", model=model, **variant).engine()
    started = time.perf_counter()
    kept, quarantined, _ = genericize_queries(queries, LLMCall(engine, None, GenerationStats()),
                                              cfg.genericizer_sampling, cfg.max_template_chars,
                                              cfg.max_description_chars, "", cfg.format_for("genericizer", model))
    seconds = time.perf_counter() - started
    close_engines()
    # the model's raw output per question, kept or quarantined: what the template index is built from
    both = pl.concat([kept.select("query_id", "raw_output"), quarantined.select("query_id", "raw_output")])
    out.write_text(json.dumps({"seconds": seconds, "kept": kept.height,
                               "recorded_deterministic": runs_deterministically(engine.info),
                               "outputs": dict(zip(both["query_id"], both["raw_output"], strict=True))}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--queries", type=int, default=60, help="sample FAQ questions (the demo has 60)")
    parser.add_argument("--runs", type=int, default=2, help="fresh runs per variant")
    parser.add_argument("--one-run", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one_run:
        one_run(json.loads(args.one_run), args.queries, Path(args.out))
        return

    results = {}
    scratch = Path(tempfile.mkdtemp(prefix="bench-determinism-"))
    for name, variant in VARIANTS.items():
        runs = []
        for i in range(args.runs):
            out = scratch / f"{len(results)}-{i}.json"
            subprocess.run([sys.executable, __file__, "--one-run", json.dumps(variant), "--out", str(out),
                            "--queries", str(args.queries)], check=True, env={**os.environ, "HF_HUB_OFFLINE": "1",
                                                                             "TRANSFORMERS_OFFLINE": "1"})
            runs.append(json.loads(out.read_text()))
        first = runs[0]["outputs"]
        same = [sum(first.get(q) == r["outputs"].get(q) for q in first) for r in runs[1:]]
        results[name] = {"variant": variant, "recorded_deterministic": runs[0]["recorded_deterministic"],
                         "queries": len(first), "same_as_first_run": same,
                         "identical_share": round(min(same) / len(first), 4) if first else None,
                         "seconds": [round(r["seconds"], 1) for r in runs]}
    print(f"\n{'variant':<40} {'queries':>7} {'same in both runs':>18} {'seconds per run':>18}")
    for name, r in results.items():
        print(f"{name:<40} {r['queries']:>7} {min(r['same_as_first_run']):>10} ({r['identical_share']:.0%})"
              f" {' / '.join(map(str, r['seconds'])):>18}")
    out = HERE / "results" / "determinism.json"
    out.write_text(json.dumps({"date": date.today().isoformat(), "machine": platform.processor() or platform.machine(),
                               "cpus": os.cpu_count(), "stage": "genericizer (demo profile, packaged model)",
                               "runs_per_variant": args.runs, "variants": results}, indent=2))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
