"""`make bench-matching`: template retrieval, measured two ways. Prints tables and writes
benchmarks/results/matching.json.

1. Real text (python3-doc): every FAQ question is a "template" in the index; documents are runs of 1, 3 or 6
   consecutive FAQ answers (questions removed) and their gold templates are the questions those answers
   answer. Each document queries the index through the pipeline's own `match_documents`; recall@k is the
   share of a document's gold questions in its top k, out of min(k, #gold). Compared: the model's own mean
   pooling (sentence-transformers, truncated at its max length), mean pooling over all windows, Gaussian
   coverage pooling (N=10, sigma 0.05, alpha 1), and the full matcher (coverage + hubness + MMR). Pooling
   overhead = extra time of coverage over mean pooling on the same windowed forward pass.
2. Scale: 1M synthetic 384-d clustered unit vectors shaped like text embeddings (see `EmbeddingLike`; the
   run prints how they compare with real MiniLM embeddings), 2,000 held-out queries; usearch HNSW in f16 and
   i8 against exact search (BLAS matrix product + partial sort, both cores), then a projection to the
   paper's 18M templates.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import numpy as np
import polars as pl
import psutil

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from fineinstructions_dagster.sample import find_doc_sources, split_sections  # noqa: E402
from fineinstructions_dagster.stages.embedding import Embedder, get_embedder  # noqa: E402
from fineinstructions_dagster.stages.matching import (  # noqa: E402
    IndexConfig,
    MatchConfig,
    build_template_index,
    match_documents,
    open_template_index,
    search_batch,
)
from fineinstructions_dagster.stages.pooling import CoveragePoolingConfig  # noqa: E402

PAPER_TEMPLATES = 18_000_000
SECTIONS_PER_DOC = (1, 3, 6)


def table(rows: list[dict], cols: list[str]) -> str:
    def fmt(v: object) -> str:
        if isinstance(v, float):
            return f"{v:,.3f}" if abs(v) < 100 else f"{v:,.0f}"
        return f"{v:,}" if isinstance(v, int) else str(v)

    cells = [[fmt(r.get(c, "")) for c in cols] for r in rows]
    widths = [max(len(c), *(len(x[i]) for x in cells)) for i, c in enumerate(cols)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(cols, widths, strict=True)),
             "  ".join("-" * w for w in widths)]
    lines += ["  ".join(x.rjust(w) if i else x.ljust(w) for i, (x, w) in enumerate(zip(r, widths, strict=True)))
              for r in cells]
    return "\n".join(lines)


# ---------------------------------------------------------------- real text


def faq_corpus() -> tuple[pl.DataFrame, pl.DataFrame]:
    """(bank of FAQ questions, documents of 1/3/6 consecutive answers with their gold question ids)."""
    src = find_doc_sources()
    questions, docs = [], []
    for f in sorted((src / "faq").glob("*.rst.txt")):
        qa = [(t, a) for t, a in split_sections(f.read_text(encoding="utf-8")) if t.endswith("?") and a]
        base = len(questions)
        questions += [{"template_id": f"q{base + i:04d}", "compatible_document_description": t, "file": f.name}
                      for i, (t, _) in enumerate(qa)]
        for s in SECTIONS_PER_DOC:
            for start in range(0, len(qa) - s + 1):
                docs.append({"doc_id": f"{f.name}:{start}:{s}", "shard": "faq", "sections": s,
                             "text": "\n\n".join(a for _, a in qa[start:start + s]),
                             "gold": [f"q{base + i:04d}" for i in range(start, start + s)]})
    return pl.DataFrame(questions), pl.DataFrame(docs)


class Precomputed:
    """Vectors already pooled for these texts: every method that shares the windowed forward pass reuses it
    (the global mean is row 0 of the coverage output, computed by the same code)."""

    def __init__(self, texts: list[str], vecs: np.ndarray, rows: slice = slice(None)):
        self.row = {t: i for i, t in enumerate(texts)}
        self.vecs = vecs[:, rows]

    def encode_documents(self, texts: list[str], pooling: CoveragePoolingConfig) -> np.ndarray:
        return self.vecs[[self.row[t] for t in texts]]


class TruncatedMean:
    """The model's own pooling as sentence-transformers runs it: one vector, text cut at the max length."""

    def __init__(self, embedder: Embedder):
        self.e = embedder

    def encode_documents(self, texts: list[str], pooling: CoveragePoolingConfig) -> np.ndarray:
        return self.e.encode(texts)[:, None, :]


def recall_at(found: pl.DataFrame, docs: pl.DataFrame, ks: tuple[int, ...] = (1, 5, 10)) -> dict[str, float]:
    gold = docs.select("doc_id", "sections", pl.col("gold").alias("template_id")).explode("template_id")
    hits = gold.join(found.select("doc_id", "template_id", "rank"), on=["doc_id", "template_id"], how="left")
    out = {}
    for k in ks:
        per_doc = hits.group_by("doc_id", "sections").agg(
            ((pl.col("rank") <= k).sum() / pl.min_horizontal(pl.len(), pl.lit(k))).alias("r"))
        out[f"recall@{k}"] = float(per_doc["r"].mean())
        for s in SECTIONS_PER_DOC:
            out[f"recall@{k}_s{s}"] = float(per_doc.filter(pl.col("sections") == s)["r"].mean())
    return out


def real_text(repeats: int) -> dict:
    emb = get_embedder()
    bank, docs = faq_corpus()
    n_tokens = sum(len(x) for x in emb._model.tokenizer(docs["text"].to_list(), add_special_tokens=False,
                                                        verbose=False)["input_ids"])
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        build_template_index(bank, emb, Path(tmp))
        build_s = time.perf_counter() - t0
        tindex = open_template_index(Path(tmp), emb, bank)
        gauss, mean = CoveragePoolingConfig(), CoveragePoolingConfig(mode="mean")
        texts = docs["text"].to_list()
        t0 = time.perf_counter()
        pooled = emb.encode_documents(texts, gauss)
        pooled_s = time.perf_counter() - t0
        plain = {"k": 10, "hubness": 0.0, "diversity": 0.0}
        methods = [
            ("model mean (truncated)", TruncatedMean(emb), MatchConfig(**plain, pooling=mean)),
            ("mean over windows", Precomputed(texts, pooled, slice(0, 1)), MatchConfig(**plain, pooling=mean)),
            ("gaussian coverage", Precomputed(texts, pooled), MatchConfig(**plain, pooling=gauss)),
            ("gaussian + hubness + MMR", Precomputed(texts, pooled), MatchConfig(k=10, pooling=gauss)),
        ]
        rows = []
        for name, encoder, cfg in methods:
            t0 = time.perf_counter()
            found, _ = match_documents(docs, tindex, encoder, cfg)  # type: ignore[arg-type]
            secs = time.perf_counter() - t0 + (pooled_s if isinstance(encoder, Precomputed) else 0.0)
            rows.append({"method": name, **recall_at(found, docs), "docs_per_s": docs.height / secs})
        # Cost of the pooling itself on one forward pass: token embeddings computed once, then each pooling
        # timed on them (best of `repeats`); overhead = extra pooling time / (forward pass + mean pooling).
        t0 = time.perf_counter()
        tokens = emb.token_embeddings(texts)
        forward_s = time.perf_counter() - t0
        pool_s = {}
        for label, cfg_p in (("mean", mean), ("gaussian", gauss)):
            runs = []
            for _ in range(repeats):
                t0 = time.perf_counter()
                emb.pool(tokens, cfg_p)
                runs.append(time.perf_counter() - t0)
            pool_s[label] = min(runs)
        del tokens
        overhead = (pool_s["gaussian"] - pool_s["mean"]) / (forward_s + pool_s["mean"])
        # usearch vs exact on these (tiny-index) queries, for completeness
        q = pooled.reshape(-1, emb.dim)
        t0 = time.perf_counter()
        approx, _, _ = search_batch(tindex.index, q, 10)
        t_approx = time.perf_counter() - t0
        t0 = time.perf_counter()
        exact, _, _ = search_batch(tindex.index, q, 10, exact=True)
        t_exact = time.perf_counter() - t0
        overlap = float(np.mean([len(set(a) & set(b)) / 10 for a, b in zip(approx, exact, strict=True)]))
        descriptions = bank["compatible_document_description"].to_list() * 8
        t0 = time.perf_counter()
        emb.encode(descriptions)
        desc_per_s = len(descriptions) / (time.perf_counter() - t0)
    by = {r["method"]: r for r in rows}
    return {
        "templates": bank.height, "documents": docs.height, "document_tokens": n_tokens,
        "documents_by_sections": {str(s): int((docs["sections"] == s).sum()) for s in SECTIONS_PER_DOC},
        "embedder": f"{emb.name}@{emb.revision}", "max_length": emb.max_length,
        "methods": rows,
        "mean_recall_at_10": by["mean over windows"]["recall@10"],
        "gaussian_recall_at_10": by["gaussian coverage"]["recall@10"],
        "gaussian_overhead": overhead,
        "forward_seconds": forward_s, "pool_seconds": pool_s,
        "docs_per_s": docs.height / (forward_s + pool_s["gaussian"]),
        "tokens_per_s": n_tokens / (forward_s + pool_s["gaussian"]),
        "index_build_seconds": build_s, "descriptions_per_s": desc_per_s,
        "search": {"queries": len(q), "usearch_seconds": t_approx, "exact_seconds": t_exact,
                   "recall_at_10_vs_exact": overlap},
    }


# ---------------------------------------------------------------- scale


class EmbeddingLike:
    """Clustered unit vectors shaped like real sentence embeddings rather than isotropic noise (on which every
    ANN index looks far worse than on text): a power-law covariance spectrum (lambda_i ~ i^-0.9, so half the
    variance lies in ~25 directions), a shared mean direction (random pairs have cosine ~0.13), 2,000
    Zipf-sized clusters. `calibration` compares it with MiniLM embeddings of python3-doc sections."""

    def __init__(self, dim: int, seed: int = 0, beta: float = 0.9, mean_weight: float = 0.45,
                 n_clusters: int = 2000, within: float = 0.6):
        rng = np.random.default_rng(seed)
        basis, _ = np.linalg.qr(rng.standard_normal((dim, dim)))
        lam = np.arange(1, dim + 1) ** -beta
        self.L = (basis * np.sqrt(lam / lam.sum())).astype(np.float32)
        mu = rng.standard_normal(dim).astype(np.float32)
        self.mu = mean_weight * mu / np.linalg.norm(mu)
        self.centres = rng.standard_normal((n_clusters, dim)).astype(np.float32) @ self.L.T
        w = 1.0 / np.sqrt(np.arange(1, n_clusters + 1))
        self.weights = w / w.sum()
        self.within, self.dim = within, dim

    def sample(self, n: int, seed: int) -> np.ndarray:
        rng = np.random.default_rng(seed)
        out = np.empty((n, self.dim), dtype=np.float32)
        for s in range(0, n, 100_000):
            m = min(100_000, n - s)
            c = rng.choice(len(self.centres), size=m, p=self.weights)
            x = self.mu + self.centres[c] + self.within * (rng.standard_normal((m, self.dim), dtype=np.float32)
                                                           @ self.L.T)
            out[s:s + m] = x / np.linalg.norm(x, axis=1, keepdims=True)
        return out


def neighbour_stats(x: np.ndarray) -> dict[str, float]:
    sims = x @ x.T
    np.fill_diagonal(sims, -1.0)
    top = -np.sort(-sims, axis=1)
    ev = np.linalg.svd(x - x.mean(0), compute_uv=False) ** 2
    cum = np.cumsum(ev) / ev.sum()
    return {"nn1_cos": float(top[:, 0].mean()), "nn10_cos": float(top[:, 9].mean()),
            "nn100_cos": float(top[:, 99].mean()), "random_pair_cos": float(sims[np.triu_indices(len(x), 1)].mean()),
            "dims_for_50pct_variance": int(np.searchsorted(cum, 0.5) + 1),
            "dims_for_90pct_variance": int(np.searchsorted(cum, 0.9) + 1)}


def calibration(gen: EmbeddingLike, n: int = 1000) -> list[dict]:
    """Real MiniLM embeddings of python3-doc library sections (first 300 characters) vs as many synthetic ones."""
    from fineinstructions_dagster.sample import corpus_sections

    texts = [r["text"][:300] for r in corpus_sections(find_doc_sources(), "library")][:n]
    real = get_embedder().encode(texts)
    return [{"vectors": f"MiniLM, python3-doc ({len(texts)})", **neighbour_stats(real)},
            {"vectors": f"synthetic ({len(texts)})", **neighbour_stats(gen.sample(len(texts), 7))}]


def exact_top(x: np.ndarray, q: np.ndarray, k: int) -> tuple[np.ndarray, float]:
    """Brute force: cosine = dot product of unit vectors (BLAS), then a partial sort."""
    t0 = time.perf_counter()
    top = np.empty((len(q), k), dtype=np.int64)
    for s in range(0, len(q), 250):
        sims = q[s:s + 250] @ x.T
        top[s:s + 250] = np.argpartition(-sims, k, axis=1)[:, :k]
    return top, time.perf_counter() - t0


def rss_mb() -> float:
    return psutil.Process().memory_info().rss / 2**20


def scale(n: int, n_queries: int, dim: int, dtypes: tuple[str, ...], ef_search: tuple[int, ...]) -> dict:
    gen = EmbeddingLike(dim)
    calib = calibration(gen)
    t0 = time.perf_counter()
    x = gen.sample(n, 1)
    q = gen.sample(n_queries, 2)  # held out: not in the index
    gen_s = time.perf_counter() - t0
    gt, exact_s = exact_top(x, q, 10)
    runs = []
    default = IndexConfig()
    for dtype in dtypes:
        cfg = IndexConfig(dtype=dtype)
        gc.collect()
        before = rss_mb()
        index = cfg.new_index(dim)
        t0 = time.perf_counter()
        for s in range(0, n, 100_000):  # in batches, as build_template_index adds them
            index.add(np.arange(s, min(s + 100_000, n), dtype=np.uint64), x[s:s + 100_000])
        build_s = time.perf_counter() - t0
        mem = index.memory_usage / 2**20
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "x.usearch"
            index.save(str(path))
            file_mb = path.stat().st_size / 2**20
        rss = rss_mb() - before
        for ef in sorted({*ef_search, default.expansion_search}):
            index.expansion_search = ef
            search_batch(index, q[:100], 10)  # warm-up
            t0 = time.perf_counter()
            keys, _, _ = search_batch(index, q, 10)
            search_s = time.perf_counter() - t0
            recall = float(np.mean([len(set(a) & set(b)) / 10 for a, b in zip(keys, gt, strict=True)]))
            runs.append({"dtype": dtype, "connectivity": cfg.connectivity, "expansion_add": cfg.expansion_add,
                         "expansion_search": ef, "build_s": build_s, "adds_per_s": n / build_s,
                         "index_mb": mem, "file_mb": file_mb, "rss_growth_mb": rss, "qps": n_queries / search_s,
                         "exact_qps": n_queries / exact_s, "speedup": exact_s / search_s, "recall_at_10": recall})
        del index
    main = next((r for r in runs if r["dtype"] == default.dtype and r["expansion_search"] == default.expansion_search),
                runs[0])  # the default's figures when it was run, else the first run's
    f = PAPER_TEMPLATES / n
    log_f = math.log(PAPER_TEMPLATES) / math.log(n)  # HNSW insert cost grows ~ log n
    projection = [{"dtype": r["dtype"], "templates": PAPER_TEMPLATES, "index_gb": r["index_mb"] * f / 1024,
                   "build_hours_2_cores": r["build_s"] * f * log_f / 3600,
                   "exact_qps": r["exact_qps"] / f}
                  for r in runs if r["expansion_search"] == default.expansion_search]
    return {"vectors": n, "queries": n_queries, "dim": dim, "calibration": calib, "generate_seconds": gen_s,
            "exact_seconds": exact_s,
            "runs": runs, "recall_at_10": main["recall_at_10"], "qps": main["qps"], "exact_qps": main["exact_qps"],
            "default_index": f"{default.dtype} M={default.connectivity} ef_add={default.expansion_add} "
                             f"ef_search={default.expansion_search}",
            "projection_18m": projection}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--vectors", type=int, default=1_000_000)
    ap.add_argument("--queries", type=int, default=2_000)
    ap.add_argument("--dtypes", default="f16,i8")
    ap.add_argument("--ef-search", default="64,128,256")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--skip-scale", action="store_true")
    ap.add_argument("--out", default=str(HERE / "results" / "matching.json"))
    args = ap.parse_args()
    t_start = time.perf_counter()

    rt = real_text(args.repeats)
    print(f"\nReal text: {rt['templates']} FAQ questions indexed; {rt['documents']} documents of 1/3/6 answers "
          f"({rt['document_tokens']:,} tokens), embedder {rt['embedder']} (max length {rt['max_length']})")
    cols = ["method", "recall@1", "recall@5", "recall@10", "recall@10_s1", "recall@10_s3", "recall@10_s6",
            "docs_per_s"]
    print(table(rt["methods"], cols))
    print(f"one windowed forward pass over all documents {rt['forward_seconds']:.1f} s ({rt['tokens_per_s']:,.0f} "
          f"tokens/s); pooling it: mean {rt['pool_seconds']['mean']:.3f} s, gaussian "
          f"{rt['pool_seconds']['gaussian']:.3f} s -> overhead {rt['gaussian_overhead']:+.2%}; index of "
          f"{rt['templates']} built in {rt['index_build_seconds']:.2f} s; descriptions embedded at "
          f"{rt['descriptions_per_s']:,.0f}/s; "
          f"usearch top-10 = exact on {rt['search']['recall_at_10_vs_exact']:.3f} of neighbours")
    result = {"date": date.today().isoformat(), "machine": f"{platform.machine()}, {os.cpu_count()} cores",
              "pooling": {k: rt[k] for k in ("mean_recall_at_10", "gaussian_recall_at_10", "gaussian_overhead")},
              "real_text": rt}
    if not args.skip_scale:
        sc = scale(args.vectors, args.queries, 384, tuple(args.dtypes.split(",")),
                   tuple(int(e) for e in args.ef_search.split(",")))
        print("\nSynthetic vectors against real embeddings (mean cosine to the 1st/10th/100th neighbour, of random "
              "pairs; directions holding 50%/90% of the variance):")
        print(table(sc["calibration"], ["vectors", "nn1_cos", "nn10_cos", "nn100_cos", "random_pair_cos",
                                        "dims_for_50pct_variance", "dims_for_90pct_variance"]))
        print(f"\nScale: {sc['vectors']:,} clustered {sc['dim']}-d vectors, {sc['queries']:,} held-out queries; "
              f"exact search {sc['exact_qps']:,.1f} queries/s; default index {sc['default_index']}")
        print(table(sc["runs"], ["dtype", "expansion_search", "recall_at_10", "qps", "speedup", "build_s",
                                 "adds_per_s", "index_mb", "file_mb"]))
        print(f"\nProjection to the paper's {PAPER_TEMPLATES:,} templates (this machine, linear x log n):")
        print(table(sc["projection_18m"], ["dtype", "templates", "index_gb", "build_hours_2_cores", "exact_qps"]))
        result["ann"] = {k: sc[k] for k in ("recall_at_10", "qps", "exact_qps")}
        result["scale"] = sc
    result["seconds"] = time.perf_counter() - t_start
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {args.out} ({result['seconds']:.0f} s)")


if __name__ == "__main__":
    main()
