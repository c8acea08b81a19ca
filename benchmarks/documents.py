"""`make bench-documents`: our documents stage vs datatrove on >= 100k documents with injected
near-duplicates at known edit rates. Prints a table and writes benchmarks/results/documents.json.

Each tool runs in its own process tree (datatrove in its own virtualenv, two workers; ours one process whose
Polars/DuckDB use both cores) on the same corpus with word 5-gram MinHash: ours with its defaults (20 bands x
6 rows, candidates confirmed at estimated Jaccard >= 0.5) and again with datatrove's 14 x 8.
Throughput per core = documents / CPU seconds of the whole process tree (user + system, sampled), so a tool
that uses several threads or processes is not flattered by them. Peak RSS is the tree's summed maximum."""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from corpus import build, score  # noqa: E402


def measure(python: str, script: str, phase: str, corpus: Path, work: Path, extra: tuple[str, ...] = ()) -> dict:
    """Run one phase in a fresh process tree; sample the whole tree (datatrove forks workers) for CPU time
    and resident memory every 0.1 s."""
    import psutil

    work.mkdir(parents=True, exist_ok=True)
    env = {"POLARS_MAX_THREADS": "2", "PATH": "/usr/bin:/bin", "HOME": str(work), "HF_HUB_OFFLINE": "1"}
    t0 = time.perf_counter()
    proc = subprocess.Popen([python, str(HERE / script), phase, str(corpus), str(work), *extra], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)
    root = psutil.Process(proc.pid)
    cpu: dict[int, float] = {}
    peak = 0.0
    while proc.poll() is None:
        try:
            tree = [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            break
        rss = 0.0
        for p in tree:
            try:
                t = p.cpu_times()
                # own time only: a parent's children_* would count reaped workers a second time
                cpu[p.pid] = max(cpu.get(p.pid, 0.0), t.user + t.system)
                rss += p.memory_info().rss
            except psutil.NoSuchProcess:
                continue
        peak = max(peak, rss / 2**20)
        time.sleep(0.1)
    out, err = proc.communicate()
    if proc.returncode != 0:
        raise SystemExit(f"{script} {phase} failed:\n{err[-4000:]}")
    result = json.loads(out.strip().splitlines()[-1])
    result.update(seconds=time.perf_counter() - t0, cpu_seconds=sum(cpu.values()), peak_rss_mb=peak)
    return result


def subset(corpus: Path, folder: Path, n: int) -> Path:
    """The first n documents of the corpus, in the same two-file layout."""
    folder.mkdir(parents=True, exist_ok=True)
    lines = [line for f in sorted(corpus.glob("corpus-*.jsonl")) for line in open(f, encoding="utf-8")][:n]
    for k in range(2):
        (folder / f"corpus-{k}.jsonl").write_text("".join(lines[k::2]), encoding="utf-8")
    return folder


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--docs", type=int, default=100_000)
    ap.add_argument("--filter-docs", type=int, default=20_000,
                    help="filtering is compared on the first N documents (datatrove's filters are slow)")
    ap.add_argument("--datatrove-python", default=str(HERE / ".venv-datatrove" / "bin" / "python"))
    ap.add_argument("--out", default=str(HERE / "results" / "documents.json"))
    args = ap.parse_args()
    data = HERE / ".data"
    corpus = build(data / f"corpus-{args.docs}", args.docs)
    truth = json.loads((corpus / "truth.json").read_text())
    filter_corpus = subset(corpus, data / f"filter-{args.filter_docs}", args.filter_docs)
    results = {}
    # `ours`: the pipeline's defaults (20 bands x 6 rows + similarity check >= 0.5). `ours_14x8`: datatrove's
    # own LSH setting (14 x 8, no check), for a like-for-like comparison of the implementations.
    runs = (("ours", sys.executable, "ours_documents.py", ()),
            ("datatrove", args.datatrove_python, "datatrove_documents.py", ()),
            ("ours_14x8", sys.executable, "ours_documents.py", ("14", "8", "0.0")))
    for name, python, script, extra in runs:
        print(f"running {name} ...", flush=True)
        work = data / f"work-{name}-{args.docs}"
        filt = measure(python, script, "filter", filter_corpus, work / "filter", extra)
        dedup = measure(python, script, "dedup", corpus, work / "dedup", extra)
        found = json.loads(Path(dedup["removed_file"]).read_text())
        removed = set(found["removed"])
        quality = score(removed, found["clusters"], truth)
        n = truth["n_docs"]
        results[name] = {
            "docs_per_s_per_core": n / dedup["cpu_seconds"],
            "recall": quality["recall"], "precision": quality["precision"], "peak_rss_mb": dedup["peak_rss_mb"],
            "dedup_seconds": dedup["seconds"], "dedup_cpu_seconds": dedup["cpu_seconds"],
            "removed": len(removed), "recall_by_edit_rate": quality["recall_by_edit_rate"],
            "filter_docs_per_s_per_core": args.filter_docs / filt["cpu_seconds"], "filter_seconds": filt["seconds"],
            "filter_kept": filt["kept"], "filter_peak_rss_mb": filt["peak_rss_mb"],
        }
    results["setup"] = {"docs": args.docs, "filter_docs": args.filter_docs, "injected_pairs": len(truth["pairs"]),
                        "date": str(date.today()),
                        "machine": f"{platform.machine()}, {__import__('os').cpu_count()} cores",
                        "minhash": "word 5-grams; ours 20x6 + similarity >= 0.5, datatrove and ours_14x8 14x8",
                        "command": "make bench-documents"}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2))
    o, d, x = results["ours"], results["datatrove"], results["ours_14x8"]
    rows = [
        ("dedup docs/s per core", f"{o['docs_per_s_per_core']:.0f}", f"{d['docs_per_s_per_core']:.0f}"),
        ("dedup wall seconds", f"{o['dedup_seconds']:.1f}", f"{d['dedup_seconds']:.1f}"),
        ("near-dup recall", f"{o['recall']:.3f}", f"{d['recall']:.3f}"),
        ("near-dup precision", f"{o['precision']:.3f}", f"{d['precision']:.3f}"),
        *[(f"  recall @ {r} edits", f"{o['recall_by_edit_rate'][r]:.3f}", f"{d['recall_by_edit_rate'][r]:.3f}")
          for r in o["recall_by_edit_rate"]],
        ("filter docs/s per core", f"{o['filter_docs_per_s_per_core']:.0f}", f"{d['filter_docs_per_s_per_core']:.0f}"),
        ("filter kept", str(o["filter_kept"]), str(d["filter_kept"])),
        ("filter wall seconds", f"{o['filter_seconds']:.1f}", f"{d['filter_seconds']:.1f}"),
        ("dedup peak RSS MB", f"{o['peak_rss_mb']:.0f}", f"{d['peak_rss_mb']:.0f}"),
        ("filter peak RSS MB", f"{o['filter_peak_rss_mb']:.0f}", f"{d['filter_peak_rss_mb']:.0f}"),
    ]
    print(f"\n{args.docs} documents ({len(truth['pairs'])} injected near-duplicates) for dedup; "
          f"the first {args.filter_docs} for filtering\n")
    print(f"| {'metric':<26} | {'ours':>10} | {'datatrove':>10} |\n|{'-' * 28}|{'-' * 12}|{'-' * 12}|")
    for name, a, b in rows:
        print(f"| {name:<26} | {a:>10} | {b:>10} |")
    print(f"\nours with datatrove's 14 bands x 8 rows, no check: recall {x['recall']:.3f}, precision "
          f"{x['precision']:.3f}, {x['docs_per_s_per_core']:.0f} docs/s per core "
          f"(by edit rate: {', '.join(f'{r}: {v:.2f}' for r, v in x['recall_by_edit_rate'].items())})")
    print(f"\nspeed-up (dedup, per core): {o['docs_per_s_per_core'] / d['docs_per_s_per_core']:.1f}x; "
          f"written to {args.out}")


if __name__ == "__main__":
    main()
