"""Explorer latency on a large root: 1M synthetic pairs across 100 shards (every table a pair page reads, with the
real columns, sorted and row-grouped as the pipeline writes them), then the time to open pages through the app.

    .venv/bin/python benchmarks/explore.py [--pairs 1000000] [--shards 100] [--work /tmp/fi-explore-bench]

The root is built once and kept (about 2 minutes, ~1 GB); pass --rebuild to make it again. Prints a table.
"""

from __future__ import annotations

import argparse
import random
import shutil
import statistics
import time
from pathlib import Path

import numpy as np
import polars as pl

from fineinstructions_dagster.lib.storage import TableStore

WORDS = ("list tuple sort method iterator generator dictionary key value string encode decode module package "
         "import class object instance attribute function argument return yield exception raise handler file "
         "path socket thread process memory garbage reference count interpreter bytecode compile").split()


def ids(prefix: str, n: int, rng: random.Random) -> list[str]:
    return [f"{prefix}{rng.getrandbits(64):016x}" for _ in range(n)]


def text(rng: np.random.Generator, n: int, words: int) -> list[str]:
    picks = rng.integers(0, len(WORDS), size=(n, words))
    vocab = np.array(WORDS)
    return [" ".join(row) for row in vocab[picks]]


def build(root: Path, n_pairs: int, n_shards: int) -> None:
    rng, nprng = random.Random(0), np.random.default_rng(0)
    store = TableStore(str(root))
    n_templates, n_queries = max(1, n_pairs // 10), max(1, n_pairs // 10)
    query_ids, template_ids = ids("q", n_queries, rng), ids("t", n_templates, rng)
    run = "00000000-0000-4000-8000-000000000000"
    gen = {"prompt": "p", "raw_output": "{}", "finish_reason": "stop", "prompt_tokens": 10, "completion_tokens": 5,
           "model": "bench-model", "model_revision": "r", "backend": "vllm", "prompt_version": "v",
           "sampling_params": "{}", "run_id": run}
    store.write("user_queries", pl.DataFrame({
        "query_id": query_ids, "source": "bench", "source_file": "bench.jsonl",
        "source_row": list(range(n_queries)), "source_id": [f"src-{i}" for i in range(n_queries)],
        "text": text(nprng, n_queries, 10), "run_id": run}), "bench")
    templates = pl.DataFrame({"query_id": query_ids[:n_templates], "source": "bench",
                              "query_text": text(nprng, n_templates, 10),
                              "genericization_id": ids("g", n_templates, rng), **gen,
                              "template_id": template_ids, "template": [f"How do I use <fi>{w}</fi>?" for w in
                                                                        text(nprng, n_templates, 2)],
                              "compatible_document_description": text(nprng, n_templates, 12), "n_slots": 1})
    store.write("templates", templates, "bench")
    store.write("template_bank", templates.select(
        "template_id", "template", "compatible_document_description", "n_slots",
        pl.concat_list("query_id").alias("query_ids"), pl.concat_list("template_id").alias("merged_template_ids"),
        pl.lit(["bench"]).alias("sources"), "genericization_id", pl.lit(1).alias("n_queries"), "run_id"))
    per_shard = n_pairs // n_shards
    for s in range(n_shards):
        shard = f"shard_{s:03d}"
        n_docs = per_shard // 2
        doc_ids = sorted(ids("d", n_docs, rng))
        docs = pl.DataFrame({"doc_id": doc_ids, "shard": shard, "source_file": f"{shard}.parquet",
                             "source_row": list(range(n_docs)), "source_id": [f"{shard}-{i}" for i in range(n_docs)],
                             "url": [f"https://example.org/{shard}/{i}" for i in range(n_docs)],
                             "text": text(nprng, n_docs, 120), "n_words": 120, "text_hash": ids("h", n_docs, rng),
                             "language": "en", "language_score": 0.99, "metadata": "{}", "run_id": run})
        store.write("documents", docs, shard)
        pair_doc = [d for d in doc_ids for _ in (0, 1)][:per_shard]
        row_of = {d: i for i, d in enumerate(doc_ids)}
        n = len(pair_doc)
        tmpl = [template_ids[i] for i in nprng.integers(0, n_templates, n)]
        m_ids, i_ids, j_ids, p_ids = (ids(k, n, rng) for k in "mijp")
        instruction, answer = text(nprng, n, 12), text(nprng, n, 40)
        store.write("matches", pl.DataFrame({
            "match_id": m_ids, "doc_id": pair_doc, "template_id": tmpl, "shard": shard, "chunk": "c0",
            "chunk_position": 0.05, "score": 0.5, "selection_score": 0.4, "rank": 1, "index_id": "i0", "pooling": "g",
            "run_id": run}), shard)
        store.write("instantiations", pl.DataFrame({
            "instantiation_id": i_ids, "match_id": m_ids, "doc_id": pair_doc, "template_id": tmpl, "shard": shard,
            **gen, "instruction": instruction, "answer": answer, "grounding": 0.9}), shard)
        store.write("judgements", pl.DataFrame({
            "judgement_id": j_ids, "instantiation_id": i_ids, "doc_id": pair_doc, "shard": shard, **gen,
            "score": 5, "feedback": "ok"}), shard)
        qid = {t: q for t, q in zip(template_ids, query_ids[:n_templates], strict=True)}
        store.write("fineinstructions", pl.DataFrame({
            "pair_id": p_ids, "instruction": instruction, "answer": answer, "judge_score": 5, "grounding": 0.9,
            "selected_judge_threshold": 4, "selected_min_grounding": 0.6, "judgement_id": j_ids,
            "instantiation_id": i_ids, "match_id": m_ids, "template_id": tmpl, "query_id": [qid[t] for t in tmpl],
            "query_ids": [[qid[t]] for t in tmpl], "doc_id": pair_doc, "shard": shard,
            "url": [f"https://example.org/{shard}/{row_of[d]}" for d in pair_doc],
            "match_score": 0.5, "match_rank": 1, "instantiator_model": "bench-model", "judge_model": "bench-model",
            "documents_run_id": run, "matches_run_id": run, "instantiations_run_id": run, "judgements_run_id": run,
            "template_bank_run_id": run, "run_id": run}), shard)
        if s % 10 == 9:
            print(f"  built {s + 1}/{n_shards} shards", flush=True)
    (root / "_bench_done").write_text(f"{n_pairs} {n_shards}\n")


def timed(fn, repeat: int) -> list[float]:  # noqa: ANN001
    out = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--pairs", type=int, default=1_000_000)
    ap.add_argument("--shards", type=int, default=100)
    ap.add_argument("--work", default="/tmp/fi-explore-bench")
    ap.add_argument("--rebuild", action="store_true")
    ap.add_argument("--samples", type=int, default=20)
    args = ap.parse_args()
    root = Path(args.work) / "root"
    marker = root / "_bench_done"
    if args.rebuild or not marker.exists() or marker.read_text().split() != [str(args.pairs), str(args.shards)]:
        shutil.rmtree(root, ignore_errors=True)
        t = time.perf_counter()
        print(f"building a root of {args.pairs:,} pairs in {args.shards} shards under {root}")
        build(root, args.pairs, args.shards)
        print(f"  built in {time.perf_counter() - t:.0f} s")
    from starlette.testclient import TestClient

    from fineinstructions_dagster.explore.app import create_app

    client = TestClient(create_app(str(root)))
    store = TableStore(str(root))
    rng = random.Random(1)
    shards = store.partitions("fineinstructions")
    picks = []
    for shard in rng.sample(shards, min(args.samples, len(shards))):
        pairs = pl.read_parquet(store.path("fineinstructions", shard), columns=["pair_id", "doc_id", "template_id"])
        picks.append(pairs.row(rng.randrange(pairs.height), named=True) | {"shard": shard})

    def page(url: str) -> None:
        r = client.get(url)
        assert r.status_code == 200, (url, r.status_code, r.text[:300])

    rows = []
    for name, url in [("pair page", "/pair/{pair_id}"), ("search by pair id (-> pair page)", "/search?q={pair_id}"),
                      ("document page", "/document/{doc_id}"), ("template page", "/template/{template_id}"),
                      ("shard page (histograms)", "/shard/{shard}")]:
        times = []
        for p in picks:
            target = url.format(**p)
            times.append(timed(lambda t=target: page(t), 1)[0])
        rows.append((name, statistics.median(times), max(times)))
    print(f"\nexplorer on {args.pairs:,} pairs in {args.shards} shards ({len(picks)} random objects each; 2 CPU cores)")
    print(f"{'page':<36} {'median s':>9} {'max s':>8}")
    for name, med, worst in rows:
        print(f"{name:<36} {med:>9.3f} {worst:>8.3f}")


if __name__ == "__main__":
    main()
