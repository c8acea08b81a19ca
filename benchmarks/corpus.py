"""Benchmark corpus: documents assembled from real sentences of the Python documentation (python3-doc),
plus near-duplicates injected at known edit rates, with the ground truth written beside it."""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

EDIT_RATES = (0.01, 0.03, 0.05, 0.10, 0.20)


def sentences() -> list[str]:
    """Distinct sentences of the Python documentation (documents are built from random sentences, so that
    two originals share almost nothing and every near-duplicate in the corpus is one we injected)."""
    from fineinstructions_dagster.sample import corpus_sections, find_doc_sources

    src = find_doc_sources()
    seen: set[str] = set()
    for folder in sorted(p.name for p in src.iterdir() if p.is_dir() and not p.name.startswith("_")):
        for row in corpus_sections(src, folder):
            for sentence in re.split(r"(?<=[.!?])\s+", row["text"].replace("\n", " ")):
                if len(sentence.split()) >= 6:
                    seen.add(sentence.strip())
    return sorted(seen)


def document(rng: random.Random, pool: list[str]) -> str:
    picked = rng.sample(pool, rng.randint(8, 24))
    return "\n\n".join(" ".join(picked[i:i + 4]) for i in range(0, len(picked), 4))


def edit(text: str, rate: float, rng: random.Random, vocab: list[str]) -> str:
    """Substitute, delete or insert words, each with probability rate / 3 per word."""
    out: list[str] = []
    for w in text.split(" "):
        r = rng.random()
        if r < rate / 3:
            out.append(rng.choice(vocab))
        elif r < 2 * rate / 3:
            continue
        elif r < rate:
            out.extend([w, rng.choice(vocab)])
        else:
            out.append(w)
    return " ".join(out)


FILES = 2  # two files so that datatrove can use both cores


def corpus_files(folder: Path) -> list[Path]:
    return [folder / f"corpus-{k}.jsonl" for k in range(FILES)]


def build(folder: Path, n_docs: int, dup_share: float = 0.1, seed: int = 0) -> Path:
    """Write folder/corpus-{0,1}.jsonl (n_docs rows in all) and folder/truth.json; reuse them if built."""
    truth_path = folder / "truth.json"
    if truth_path.exists() and json.loads(truth_path.read_text())["n_docs"] == n_docs:
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    pool = sentences()
    vocab = sorted({w for p in pool[:5000] for w in p.split()})
    n_dups = int(n_docs * dup_share)
    originals = [f"doc{i:07d}" for i in range(n_docs - n_dups)]
    texts: dict[str, str] = {d: document(rng, pool) for d in originals}
    pairs = []
    for j in range(n_dups):
        orig = rng.choice(originals)
        rate = EDIT_RATES[j % len(EDIT_RATES)]
        copy = f"dup{j:07d}"
        texts[copy] = edit(texts[orig], rate, rng, vocab)
        pairs.append({"copy": copy, "original": orig, "rate": rate})
    ids = list(texts)
    rng.shuffle(ids)
    handles = [open(f, "w", encoding="utf-8") for f in corpus_files(folder)]  # noqa: SIM115
    for i, d in enumerate(ids):
        handles[i % FILES].write(json.dumps({"id": d, "text": texts[d], "url": f"https://bench.example/{d}"}) + "\n")
    for fh in handles:
        fh.close()
    truth_path.write_text(json.dumps({"n_docs": n_docs, "pairs": pairs}))
    return folder


def score(removed: set[str], clusters: dict[str, int], truth: dict) -> dict[str, float]:
    """A pair is found when the copy and its original end in the same duplicate cluster with one of them
    removed. Precision: removed documents that sit in one cluster with their injected partner, over all
    removed documents (the originals share almost nothing, so any other removal is a false positive)."""
    found, per_rate = 0, {}
    correct: set[str] = set()
    for p in truth["pairs"]:
        c, o = clusters.get(p["copy"], -1), clusters.get(p["original"], -2)
        hit = c == o and (p["copy"] in removed or p["original"] in removed)
        found += hit
        per_rate.setdefault(p["rate"], []).append(hit)
        if hit:
            correct.update(d for d in (p["copy"], p["original"]) if d in removed)
    return {
        "recall": found / max(len(truth["pairs"]), 1),
        "precision": len(correct) / max(len(removed), 1),
        "recall_by_edit_rate": {str(r): sum(v) / len(v) for r, v in sorted(per_rate.items())},
    }
