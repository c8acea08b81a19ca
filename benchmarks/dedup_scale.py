"""`make bench-dedup-scale`: the three near-duplicate steps of `fineinstructions_dagster.stages.dedup` on synthetic
MinHash signatures of N = 1M and 8M documents (shards of 125,000): seconds, documents/s (wall) and peak RSS of each
step, and whether memory stays flat as N grows eightfold. Then recall and precision against planted clusters.

No text and nothing downloaded: signatures are random (NumPy), with about 2.5% of the documents in planted
clusters of 2-4 members spread over shards (and some within one). Each member is its cluster's base signature
with every value replaced by a random one with probability q ~ U(0.02, 0.15) (estimated Jaccard 0.85-0.98 to the
base); a fifth of the clusters are exact copies (same signature and text key). Every other document is random
with a unique text key.

Steps, each in a fresh process (as a Dagster step runs) whose process tree is sampled every 0.1 s for CPU time and
resident memory (`documents.measure`), with POLARS_MAX_THREADS=2:
- `signatures`: generate the shards batch by batch, `signature_rows`, signature and band-row part files, merged into
  one file per shard as the pipeline does (`sort_band_rows` for band rows, `TableStore.write_parts`' sink for
  signatures);
- `buckets`: `range_edges` for the 16 bucket ranges in sequence, one edge file per range;
- `components`: `decide_duplicates` over every range's edges, decisions written per shard.
Recall = sum over planted clusters of min(removed members, size - 1) / sum(size - 1); precision = removed documents
that are planted members of a cluster that keeps at least one member / all removed documents.
Writes benchmarks/results/dedup_scale.json and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import time
from datetime import date
from pathlib import Path

import numpy as np
import polars as pl

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(REPO))
from documents import measure  # noqa: E402

from fineinstructions_dagster.lib.storage import ROW_GROUP_ROWS  # noqa: E402
from fineinstructions_dagster.stages.dedup import (  # noqa: E402
    MinhashConfig,
    bucket_range_keys,
    decide_duplicates,
    id_keys,
    range_edges,
    signature_rows,
    sort_band_rows,
)

DATA = HERE / ".data" / "dedup-scale"
RESULTS = HERE / "results" / "dedup_scale.json"
SHARD_DOCS = 125_000
BATCH_DOCS = 25_000
PLANTED_SHARE = 0.025
SIZE_P = {2: 0.5, 3: 0.3, 4: 0.2}  # cluster sizes (mean 2.7)
EXACT_SHARE = 0.2
Q_RANGE = (0.02, 0.15)
SEED = 20240601
STEPS = ("signatures", "buckets", "components")
# Salts of the counter-based hashes that make every shard's documents computable on their own.
DOC_SALT, TEXT_SALT, BASE_SALT, MASK_SALT = (np.uint64(s) for s in (
    0x243F6A8885A308D3, 0x13198A2E03707344, 0xA4093822299F31D0, 0x082EFA98EC4E6C89))
CLUSTER_TEXT = np.uint64(1 << 62)  # text keys of exact clusters: inputs no document index reaches


def mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: a bijection of uint64, so distinct inputs give distinct keys."""
    x = np.asarray(x, dtype=np.uint64)
    with np.errstate(over="ignore"):
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))


def doc_keys(index: np.ndarray) -> np.ndarray:
    return mix64(index.astype(np.uint64) ^ DOC_SALT)


def shard_names(n: int) -> list[str]:
    return [f"shard-{i:03d}" for i in range((n + SHARD_DOCS - 1) // SHARD_DOCS)]


def planted(n: int, seed: int) -> pl.DataFrame:
    """The planted clusters: one row per member (global index, doc_key, cluster, size, exact, q), members of a
    cluster drawn anywhere in the corpus (so mostly in different shards, sometimes in the same one)."""
    rng = np.random.default_rng([seed, n])
    target = round(PLANTED_SHARE * n)
    sizes = rng.choice(list(SIZE_P), size=int(target / 2.7) + 16, p=list(SIZE_P.values()))
    sizes = sizes[: int(np.searchsorted(np.cumsum(sizes), target)) + 1]
    total = int(sizes.sum())
    picked = np.unique(rng.integers(0, n, size=total + total // 8 + 64))  # no O(n) permutation
    members = rng.permutation(picked)[:total]
    if members.size < total:
        raise ValueError("too few distinct members drawn")
    cluster = np.repeat(np.arange(sizes.size), sizes)
    exact = rng.random(sizes.size) < EXACT_SHARE
    q = rng.uniform(*Q_RANGE, size=total)
    return pl.DataFrame({"index": members.astype(np.int64), "doc_key": doc_keys(members), "cluster": cluster,
                         "size": np.repeat(sizes, sizes).astype(np.int8), "exact": exact[cluster],
                         "q": np.where(exact[cluster], 0.0, q)}).sort("index")


def batch_signatures(start: int, stop: int, truth: pl.DataFrame, rng: np.random.Generator,
                     cfg: MinhashConfig) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(doc_key, text_key, signatures) of documents [start, stop): random, except the planted members'."""
    index = np.arange(start, stop, dtype=np.uint64)
    sig = rng.integers(0, 1 << 32, size=(stop - start, cfg.num_perm), dtype=np.uint32)
    text_key = mix64(index ^ TEXT_SALT)
    mine = truth.filter(pl.col("index").is_between(start, stop, closed="left"))
    if mine.height:
        row = mine["index"].to_numpy() - start
        cluster = mine["cluster"].to_numpy().astype(np.uint64)
        j = np.arange(cfg.num_perm, dtype=np.uint64)
        with np.errstate(over="ignore"):
            base = (mix64((cluster[:, None] * np.uint64(cfg.num_perm) + j) ^ BASE_SALT) >> np.uint64(32))
            u = mix64((mine["index"].to_numpy().astype(np.uint64)[:, None] * np.uint64(cfg.num_perm) + j) ^ MASK_SALT)
        replaced = (u >> np.uint64(11)).astype(np.float64) / float(1 << 53) < mine["q"].to_numpy()[:, None]
        sig[row] = np.where(replaced, sig[row], base.astype(np.uint32))
        exact = mine["exact"].to_numpy()
        text_key[row[exact]] = mix64((cluster[exact] | CLUSTER_TEXT) ^ TEXT_SALT)
    return doc_keys(index), text_key, sig


def publish(parts: list[Path], target: Path) -> None:
    """Part files -> one partition file, as `TableStore.write_parts` does (row groups of ROW_GROUP_ROWS)."""
    pl.scan_parquet(parts).sink_parquet(target, compression="zstd", row_group_size=ROW_GROUP_ROWS)


def step_signatures(data: Path, work: Path, n: int, seed: int) -> dict:
    cfg = MinhashConfig()
    truth = planted(n, seed)
    truth.write_parquet(data / "truth.parquet")
    for folder in ("signatures", "bands"):
        (data / folder).mkdir(parents=True, exist_ok=True)
    for s, shard in enumerate(shard_names(n)):
        scratch = work / "scratch" / shard
        scratch.mkdir(parents=True, exist_ok=True)
        sig_parts, band_parts = [], []
        lo, hi = s * SHARD_DOCS, min(n, (s + 1) * SHARD_DOCS)
        for b, start in enumerate(range(lo, hi, BATCH_DOCS)):
            rng = np.random.default_rng([seed, s, b])
            doc_key, text_key, sig = batch_signatures(start, min(hi, start + BATCH_DOCS), truth, rng, cfg)
            signatures, bands = signature_rows(doc_key, text_key, sig, cfg)
            sig_parts.append(scratch / f"sig-{b:06d}.parquet")
            band_parts.append(scratch / f"bands-{b:06d}.parquet")
            signatures.write_parquet(sig_parts[-1])  # as prepare_shard writes its parts (Polars' default: zstd)
            bands.write_parquet(band_parts[-1])
            del signatures, bands, sig
        sort_band_rows(band_parts, data / "bands" / f"{shard}.parquet", scratch)  # as the filter step publishes it
        publish(sig_parts, data / "signatures" / f"{shard}.parquet")
        shutil.rmtree(scratch)
    return {"shards": len(shard_names(n)), "planted_members": truth.height,
            "planted_clusters": int(truth["cluster"].n_unique())}


def step_buckets(data: Path) -> dict:
    cfg = MinhashConfig()
    shards = sorted(p.stem for p in (data / "bands").glob("*.parquet"))
    bands = {s: data / "bands" / f"{s}.parquet" for s in shards}
    signatures = {s: data / "signatures" / f"{s}.parquet" for s in shards}
    (data / "edges").mkdir(exist_ok=True)
    total, seconds = 0, {}
    for key in bucket_range_keys():
        t0 = time.perf_counter()
        edges = range_edges(bands, signatures, key, cfg)
        edges.write_parquet(data / "edges" / f"{key}.parquet", compression="zstd")
        seconds[key] = round(time.perf_counter() - t0, 2)
        total += edges.height
    return {"edges": total, "range_seconds": seconds}


def step_components(data: Path) -> dict:
    """As `document_clusters` does it: range files merged one at a time, removal lists written per shard."""
    import pyarrow.parquet as pq

    cfg = MinhashConfig()
    files = [data / "edges" / f"{k}.parquet" for k in bucket_range_keys()]
    n_edges = sum(pq.ParquetFile(f).metadata.num_rows for f in files)
    shards = sorted(p.stem for p in (data / "bands").glob("*.parquet"))
    removed = decide_duplicates((pl.read_parquet(f) for f in files), cfg, shards=shards, removed_only=True)
    out = data / "decisions"
    out.mkdir(exist_ok=True)
    for shard in shards:
        removed.filter(pl.col("shard") == shard).write_parquet(out / f"{shard}.parquet", compression="zstd")
    return {"edges": n_edges, "removed": removed.height}


def score(data: Path) -> dict:
    truth = pl.read_parquet(data / "truth.parquet", columns=["doc_key", "cluster", "size"])
    decisions = pl.read_parquet(data / "decisions" / "*.parquet", columns=["doc_id", "kept"])
    removed = pl.DataFrame({"doc_key": id_keys(decisions.filter(~pl.col("kept"))["doc_id"])})
    per_cluster = (truth.join(removed.with_columns(gone=pl.lit(True)), on="doc_key", how="left")
                   .group_by("cluster").agg(pl.col("size").first().cast(pl.Int64), pl.col("gone").sum().alias("gone")))
    recall = (per_cluster.select((pl.min_horizontal("gone", pl.col("size") - 1)).sum()).item()
              / per_cluster.select((pl.col("size") - 1).sum()).item())
    fine = per_cluster.filter(pl.col("gone") < pl.col("size"))["cluster"]
    good = removed.join(truth, on="doc_key", how="inner").filter(pl.col("cluster").is_in(fine.implode())).height
    return {"recall": recall, "precision": good / removed.height if removed.height else 1.0,
            "removed": removed.height, "planted_members": truth.height,
            "planted_duplicates": int(per_cluster.select((pl.col("size") - 1).sum()).item())}


def child(step: str, data: Path, work: Path, n: int, seed: int) -> None:
    """One step in this (fresh) process; the last stdout line is the result for `measure`."""
    if step == "signatures":
        result = step_signatures(data, work, n, seed)
    elif step == "buckets":
        result = step_buckets(data)
    elif step == "components":
        result = step_components(data)
    else:
        raise SystemExit(f"unknown step {step!r}")
    print(json.dumps(result))


def run_size(n: int, seed: int, keep_data: bool, repeats: int) -> dict:
    data = DATA / f"n{n}"
    shutil.rmtree(data, ignore_errors=True)
    data.mkdir(parents=True)
    steps = {}
    for step in STEPS:
        print(f"  {n:,} documents: {step} ...", flush=True)
        # The bucket and components steps read what the step before wrote, so they can run again: the median
        # of `repeats` runs (peak RSS varies by ~15 MB run to run here, on a base of ~200 MB).
        tries = [measure(sys.executable, Path(__file__).name, step, data, data / "work", (str(n), str(seed)))
                 for _ in range(1 if step == "signatures" else repeats)]
        steps[step] = {**tries[0], **{k: statistics.median(t[k] for t in tries)
                                      for k in ("seconds", "cpu_seconds", "peak_rss_mb")},
                       "peak_rss_mb_runs": [round(t["peak_rss_mb"], 1) for t in tries]}
        print(f"    {steps[step]['seconds']:.1f} s, peak RSS {steps[step]['peak_rss_mb']:.0f} MB "
              f"(runs: {steps[step]['peak_rss_mb_runs']})", flush=True)
    quality = score(data)
    if not keep_data:
        shutil.rmtree(data, ignore_errors=True)
    return {"steps": steps, "quality": quality}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[1_000_000, 8_000_000])
    ap.add_argument("--seed", type=int, default=SEED)
    ap.add_argument("--keep-data", action="store_true", help=f"keep the generated files under {DATA}")
    ap.add_argument("--out", default=str(RESULTS))
    ap.add_argument("--repeats", type=int, default=3, help="runs of the bucket and components steps (median)")
    args = ap.parse_args()
    load = os.getloadavg()  # the machine may be shared: wall-clock figures depend on it
    runs = {}
    for n in args.sizes:
        runs[n] = run_size(n, args.seed, args.keep_data, args.repeats)
    sizes = list(args.sizes)
    steps = {step: {"seconds": [round(runs[n]["steps"][step]["seconds"], 2) for n in sizes],
                    "cpu_seconds": [round(runs[n]["steps"][step]["cpu_seconds"], 2) for n in sizes],
                    "docs_per_s": [round(n / runs[n]["steps"][step]["seconds"]) for n in sizes],
                    "peak_rss_mb": [round(runs[n]["steps"][step]["peak_rss_mb"], 1) for n in sizes],
                    "peak_rss_mb_runs": [runs[n]["steps"][step]["peak_rss_mb_runs"] for n in sizes]}
             for step in STEPS}
    quality = {n: runs[n]["quality"] for n in sizes}
    results = {
        "sizes": sizes, "steps": steps,
        "recall": min(q["recall"] for q in quality.values()),
        "precision": min(q["precision"] for q in quality.values()),
        "recall_by_size": [quality[n]["recall"] for n in sizes],
        "precision_by_size": [quality[n]["precision"] for n in sizes],
        "removed_by_size": [quality[n]["removed"] for n in sizes],
        "planted_duplicates_by_size": [quality[n]["planted_duplicates"] for n in sizes],
        "edges_by_size": [runs[n]["steps"]["buckets"]["edges"] for n in sizes],
        "bucket_range_seconds": {str(n): runs[n]["steps"]["buckets"]["range_seconds"] for n in sizes},
        "setup": {"date": str(date.today()), "machine": f"{platform.machine()}, {os.cpu_count()} cores",
                  "command": "make bench-dedup-scale" + ("" if sizes == [1_000_000, 8_000_000]
                                                         else f" (--sizes {' '.join(map(str, sizes))})"),
                  "planted_fraction": PLANTED_SHARE, "exact_cluster_fraction": EXACT_SHARE,
                  "cluster_sizes": {str(k): v for k, v in SIZE_P.items()}, "replace_probability": list(Q_RANGE),
                  "shard_docs": SHARD_DOCS, "batch_docs": BATCH_DOCS, "polars_max_threads": 2,
                  "minhash": MinhashConfig().version, "seed": args.seed,
                  "load_average_at_start": [round(x, 2) for x in load]},
    }
    if len(sizes) > 1:
        small, large = sizes[0], sizes[-1]
        results["targets"] = {
            "rss_ratio_largest_vs_smallest": {s: round(steps[s]["peak_rss_mb"][-1] / steps[s]["peak_rss_mb"][0], 3)
                                              for s in STEPS},
            "rss_flat_and_under_2gb": all(steps[s]["peak_rss_mb"][-1] <= 1.3 * steps[s]["peak_rss_mb"][0]
                                          and steps[s]["peak_rss_mb"][-1] < 2048 for s in STEPS),
            "docs_per_s_at_least_50k": all(steps[s]["docs_per_s"][-1] >= 50_000 for s in STEPS),
            "recall_precision_at_least_0_99": results["recall"] >= 0.99 and results["precision"] >= 0.99,
            "compared": [small, large],
        }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2))
    head = ("step", "documents", "seconds", "CPU s", "docs/s", "peak RSS MB")
    print("\n| {:<10} | {:>10} | {:>8} | {:>8} | {:>9} | {:>11} |".format(*head))
    print(f"|{'-' * 12}|{'-' * 12}|{'-' * 10}|{'-' * 10}|{'-' * 11}|{'-' * 13}|")
    for step in STEPS:
        for i, n in enumerate(sizes):
            st = steps[step]
            print(f"| {step:<10} | {n:>10,} | {st['seconds'][i]:>8.1f} | {st['cpu_seconds'][i]:>8.1f} | "
                  f"{st['docs_per_s'][i]:>9,} | {st['peak_rss_mb'][i]:>11.0f} |")
    print()
    for n in sizes:
        q = quality[n]
        print(f"{n:>10,} documents: recall {q['recall']:.4f}, precision {q['precision']:.4f} "
              f"({q['removed']:,} removed, {q['planted_duplicates']:,} planted duplicates)")
    if "targets" in results:
        print(f"\ntargets: {json.dumps({k: v for k, v in results['targets'].items() if k != 'compared'})}")
    print(f"written to {args.out}")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] in STEPS:
        # measure() runs: dedup_scale.py STEP DATA WORK N SEED
        child(sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]))
    else:
        main()
