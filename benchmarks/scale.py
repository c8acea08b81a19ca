"""`make bench-scale`: the shard chain (documents to export) on two shard sizes, N and 8N documents, with the
smoke model; per stage, seconds per row and peak RSS (each stage runs in its own process, as a Dagster step
does). Then instantiations of the N shard killed with SIGKILL at about half of its chunks and resumed: the
engine requests of the resume against the uninterrupted run's, and whether the partition is identical.

Documents are built from random sentences of the Python documentation (python3-doc), so they are real text and
share almost nothing; outputs are kept short (few tokens per generation) so the whole run takes minutes.
Writes benchmarks/results/scale.json and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO))
WORK = HERE / ".scale"
RESULTS = HERE / "results" / "scale.json"
CHAIN = ["documents", "matches", "instantiations", "judgements", "fineinstructions", "pretraining_export"]
CHUNK_ROWS = 512


def bench_resources() -> dict:
    """The smoke profile's resources with short generations (few output tokens) and `CHUNK_ROWS` chunks."""
    from dataclasses import replace

    from fineinstructions_dagster.defs.resources import PipelineResource, build_resources
    from fineinstructions_dagster.llm.engines import SamplingConfig

    class BenchPipeline(PipelineResource):
        def config(self):  # type: ignore[no-untyped-def]
            short = SamplingConfig(max_tokens=48, temperature=1.0)
            return replace(super().config(), chunk_rows=CHUNK_ROWS, max_document_chars=600,
                           max_instruction_chars=32, max_answer_chars=48, max_feedback_chars=24,
                           instantiator_sampling=short, judge_sampling=short)

    resources = build_resources()
    resources["pipeline"] = BenchPipeline(profile="smoke")
    return resources


def materialize_step(selection: list[str], partition: str | None) -> dict:
    """One Dagster run of `selection` (in this process); returns the materializations' metadata numbers."""
    from dagster import AssetSelection, DagsterInstance, materialize

    from fineinstructions_dagster.definitions import ASSETS
    from fineinstructions_dagster.defs.partitions import EVERY_BUCKET_RANGE
    from fineinstructions_dagster.defs.run_health import release_dead_runs, runner_tags
    from fineinstructions_dagster.runner import DEDUP_STEP, EXPORT_STEP, FILTER_STEP

    # the runner's steps: the filter writes three tables; dedup is every bucket range, then the components
    named = {"quality": AssetSelection.groups("quality"), "filtered_documents": FILTER_STEP, "dedup": DEDUP_STEP,
             "pretraining_export": EXPORT_STEP}
    with DagsterInstance.get() as instance:
        release_dead_runs(instance)  # the run SIGKILLed below must not keep the gpu slot from its resume
        result = materialize(list(ASSETS),
                             selection=named.get(selection[0], selection) if len(selection) == 1 else selection,
                             partition_key=partition, instance=instance, resources=bench_resources(),
                             raise_on_error=False,
                             tags={**runner_tags(), **(EVERY_BUCKET_RANGE if selection == ["dedup"] else {})})
        if not result.success:
            failure = next((e for e in result.all_events if e.is_step_failure), None)
            raise SystemExit(f"{selection}[{partition}] failed: "
                             f"{failure.step_failure_data.error.message if failure else 'run failed'}")
        out: dict[str, float] = {}
        for event in result.get_asset_materialization_events():
            for k, v in event.step_materialization_data.materialization.metadata.items():
                if isinstance(getattr(v, "value", None), (int, float)):
                    out[k] = float(v.value)
        return out


def run_stage(env: dict[str, str], selection: str, partition: str | None, kill_when=None) -> dict:
    """The step in a child process: wall seconds, the child's peak RSS (MB) and the metadata it recorded."""
    started = time.monotonic()
    args = [sys.executable, str(Path(__file__)), "--step", selection] + (["--partition", partition] if partition
                                                                         else [])
    log = WORK / "logs" / f"{selection}-{partition}-{int(started * 1000)}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    out_path = log.with_suffix(".out")
    with open(log, "w") as err, open(out_path, "w") as out:  # files, not pipes: a chatty child never blocks
        proc = subprocess.Popen(args, env=env, cwd=REPO, stdout=out, stderr=err, text=True)
    killed = False
    while True:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid == proc.pid:
            break
        if kill_when is not None and not killed and kill_when():
            os.kill(proc.pid, signal.SIGKILL)
            killed = True
        time.sleep(0.2)
    proc.returncode = os.waitstatus_to_exitcode(status)
    stdout = out_path.read_text()
    if not killed and proc.returncode != 0:
        raise SystemExit(f"step {selection}[{partition}] failed:\n{log.read_text()[-3000:]}")
    meta = json.loads(stdout.strip().splitlines()[-1]) if not killed else {}
    return {"seconds": time.monotonic() - started, "peak_rss_mb": usage.ru_maxrss / 1024, "meta": meta,
            "killed": killed}


def build_inputs(work: Path, n: int) -> dict[str, int]:
    """Queries from the Python FAQ, and two shards of n and 8n documents of 5-8 random documentation sentences."""
    import polars as pl

    from benchmarks.corpus import sentences
    from fineinstructions_dagster.sample import build_sample

    build_sample(work / "sample", shards=(), max_queries=40)
    (work / "inputs" / "queries").mkdir(parents=True, exist_ok=True)
    shutil.copy(work / "sample" / "queries" / "python_faq.jsonl", work / "inputs" / "queries" / "python_faq.jsonl")
    pool = sentences()
    corpus = work / "inputs" / "corpus"
    corpus.mkdir(parents=True, exist_ok=True)
    sizes = {}
    for name, size in (("n", n), ("n8", 8 * n)):
        rng = random.Random(size)
        texts = [" ".join(rng.sample(pool, rng.randint(5, 8))) for _ in range(size)]
        pl.DataFrame({"id": [f"{name}-{i}" for i in range(size)], "text": texts,
                      "url": [f"https://bench.example/{name}/{i}" for i in range(size)]}).write_parquet(
            corpus / f"{name}.parquet")
        sizes[name] = size
    return sizes


def run_chain(n: int, env: dict[str, str]) -> tuple[dict[str, int], dict]:
    """Shared steps, then the shard chain on both shards, each step in its own process."""
    shutil.rmtree(WORK, ignore_errors=True)
    home = Path(env["DAGSTER_HOME"])
    home.mkdir(parents=True)
    shutil.copy(REPO / "deploy" / "dagster.local.yaml", home / "dagster.yaml")
    sizes = build_inputs(WORK, n)
    from dagster import DagsterInstance

    with DagsterInstance.from_config(str(home)) as instance:
        instance.add_dynamic_partitions("query_source", ["python_faq"])
        instance.add_dynamic_partitions("corpus_shard", list(sizes))
    print(f"shards: {sizes}; chunk_rows={CHUNK_ROWS}", flush=True)
    for step, part in (("user_queries", "python_faq"), ("templates", "python_faq"), ("template_bank", None),
                       ("template_index", None), ("filtered_documents", "n"), ("filtered_documents", "n8"),
                       ("dedup", None)):
        run_stage(env, step, part)
    stages: dict[str, dict[str, list[float]]] = {s: {"peak_rss_mb": [], "seconds_per_row": [], "rows": []}
                                                 for s in CHAIN}
    for shard in sizes:
        for stage in CHAIN:
            if stage == "pretraining_export":
                run_stage(env, "quality", None)  # the export's gate: dbt tests over the current pairs
            got = run_stage(env, stage, shard)
            rows = got["meta"].get("total") or got["meta"].get("dagster/row_count") or 1
            stages[stage]["peak_rss_mb"].append(round(got["peak_rss_mb"], 1))
            stages[stage]["seconds_per_row"].append(round(got["seconds"] / rows, 5))
            stages[stage]["rows"].append(int(rows))
            print(f"  {stage:<20} [{shard:>3}] {int(rows):>7} rows  {got['seconds']:7.1f} s  "
                  f"{got['peak_rss_mb']:7.0f} MB", flush=True)
    return sizes, stages


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--n", type=int, default=2000)
    parser.add_argument("--step")
    parser.add_argument("--partition")
    parser.add_argument("--resume-only", action="store_true",
                        help="redo only the kill-and-resume part, over the last run's work folder")
    args = parser.parse_args()
    if args.step:  # child: one step
        print(json.dumps(materialize_step([args.step], args.partition)))
        return

    home = WORK / "home"
    env = {**os.environ, "DAGSTER_HOME": str(home), "FINEINSTRUCTIONS_ROOT": str(WORK / "root"),
           "FINEINSTRUCTIONS_QUERIES": str(WORK / "inputs" / "queries"),
           "FINEINSTRUCTIONS_CORPUS": str(WORK / "inputs" / "corpus"), "FINEINSTRUCTIONS_PROFILE": "smoke",
           "FINEINSTRUCTIONS_LLM_BACKEND": "vllm", "VLLM_LOGGING_LEVEL": "ERROR", "HF_HUB_OFFLINE": "1",
           "TRANSFORMERS_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    if args.resume_only:
        saved = json.loads((WORK / "chain.json").read_text())
        sizes, stages = saved["sizes"], saved["stages"]
    else:
        sizes, stages = run_chain(args.n, env)
        (WORK / "chain.json").write_text(json.dumps({"sizes": sizes, "stages": stages}))

    # Resume: two copies of the root with everything before instantiations and an empty generation cache; on one
    # the step runs uninterrupted, on the other it is SIGKILLed once about half of the shard's chunks are on the
    # root and then run again.
    root = WORK / "root"
    keep_out = shutil.ignore_patterns("_cache", "instantiations", "judgements", "fineinstructions", "export_*",
                                      "_parts")
    copies = {}
    for name in ("root-full", "root-resume"):
        copies[name] = WORK / name
        shutil.rmtree(copies[name], ignore_errors=True)
        shutil.copytree(root, copies[name], ignore=keep_out)
    full = run_stage({**env, "FINEINSTRUCTIONS_ROOT": str(copies["root-full"])}, "instantiations", "n")["meta"]
    resumed_root = copies["root-resume"]
    renv = {**env, "FINEINSTRUCTIONS_ROOT": str(resumed_root)}
    total_chunks = max(1, -(-stages["instantiations"]["rows"][0] // CHUNK_ROWS))
    parts = resumed_root / "_parts" / "instantiations" / "n"
    killed = run_stage(renv, "instantiations", "n",
                       kill_when=lambda: len(list(parts.glob("*.json"))) >= total_chunks / 2 if parts.exists()
                       else False)
    done_before_kill = len(list(parts.glob("*.json")))
    resumed = run_stage(renv, "instantiations", "n")
    import polars as pl

    def rows(r: Path) -> pl.DataFrame:
        return pl.read_parquet(r / "instantiations" / "n.parquet").drop("run_id").sort("instantiation_id")

    identical = rows(copies["root-full"]).equals(rows(resumed_root))
    result = {
        "sizes": [sizes["n"], sizes["n8"]],
        "chunk_rows": CHUNK_ROWS,
        "stages": {s: {"peak_rss_mb": v["peak_rss_mb"], "seconds_per_row": v["seconds_per_row"]}
                   for s, v in stages.items()},
        "rows": {s: v["rows"] for s, v in stages.items()},
        "resume": {"full_engine_requests": int(full.get("engine_requests", 0)),
                   "resume_engine_requests": int(resumed["meta"].get("engine_requests", 0)),
                   "killed_at_fraction": round(done_before_kill / total_chunks, 3),
                   "chunks_resumed": int(resumed["meta"].get("chunks_resumed", 0)),
                   "identical_output": bool(identical and killed["killed"])},
        "date": time.strftime("%Y-%m-%d"),
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2))
    print(f"\n{'stage':<20} {'peak RSS N':>11} {'peak RSS 8N':>12} {'ratio':>6} {'s/row N':>9} {'s/row 8N':>9} "
          f"{'ratio':>6}")
    for s, v in result["stages"].items():
        rss, spr = v["peak_rss_mb"], v["seconds_per_row"]
        print(f"{s:<20} {rss[0]:>9.0f}MB {rss[1]:>10.0f}MB {rss[1] / rss[0]:>6.2f} {spr[0]:>9.5f} {spr[1]:>9.5f} "
              f"{spr[1] / spr[0]:>6.2f}")
    r = result["resume"]
    share = r["resume_engine_requests"] / max(1, r["full_engine_requests"])
    print(f"\nresume: killed at {r['killed_at_fraction']:.0%} of the chunks; engine requests "
          f"{r['resume_engine_requests']} vs {r['full_engine_requests']} uninterrupted ({share:.0%}); "
          f"identical output: {r['identical_output']}")
    print(f"written {RESULTS}")


if __name__ == "__main__":
    main()
