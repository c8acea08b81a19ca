"""Near-duplicate detection across corpus shards: MinHash signatures per shard, LSH buckets and duplicate
clusters over all shards at once.

Written by hand (not datasketch) because a per-batch vectorised pipeline is much faster than hashing
shingle by shingle in Python: DuckDB builds word 5-gram shingles and hashes them with MD5 (stable across
versions and machines, so signatures stored today still match signatures computed next year), NumPy
applies the permutations and takes per-document minima with `minimum.reduceat`, and SciPy finds the
connected components of the candidate graph. `benchmarks/documents.py` measures it against datatrove.

Decisions are a function of the set of shards, not of the order they ran in: each cluster keeps the
member with the smallest `doc_id`.
"""

from __future__ import annotations

from dataclasses import dataclass

import duckdb
import numpy as np
import polars as pl
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components


@dataclass(frozen=True)
class MinhashConfig:
    """Word 5-grams like datatrove, but 20 bands x 6 rows (LSH threshold ~0.61, datatrove's 14 x 8 is ~0.72)
    with every candidate pair confirmed by its estimated Jaccard similarity: more near-duplicates found at
    the same precision (benchmarks/documents.py measures both settings)."""

    ngram: int = 5
    bands: int = 20
    rows: int = 6
    seed: int = 1
    # Candidates from a shared bucket are confirmed only if their estimated Jaccard similarity
    # (share of equal signature values) reaches this; it is what lets shorter bands keep precision.
    min_similarity: float = 0.5

    def __post_init__(self) -> None:
        if self.ngram < 1 or self.bands < 1 or self.rows < 1:
            raise ValueError(f"ngram, bands and rows must be >= 1: {self}")
        if not 0.0 <= self.min_similarity <= 1.0:
            raise ValueError("min_similarity must be in [0, 1]")

    @property
    def num_perm(self) -> int:
        return self.bands * self.rows

    @property
    def version(self) -> str:
        """Signatures are comparable only under the same version string."""
        return f"minhash-md5-{self.ngram}g-{self.bands}x{self.rows}-s{self.seed}"


def _permutations(cfg: MinhashConfig) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(cfg.seed)
    # Odd multipliers and random seeds, one pair per permutation.
    a = rng.integers(1, 1 << 63, size=cfg.num_perm, dtype=np.uint64) | np.uint64(1)
    b = rng.integers(0, 1 << 63, size=cfg.num_perm, dtype=np.uint64)
    return a, b


FNV_PRIME = np.uint64(0x100000001B3)
MIX = np.uint64(0xBF58476D1CE4E5B9)  # splitmix64's multiplier


def word_hashes(texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """(doc index, 64-bit word hash) for every lower-cased word, in document order. Words are hashed
    with MD5 in DuckDB once per distinct word of the batch (natural text repeats words a lot)."""
    words = (
        pl.DataFrame({"t": texts}, schema={"t": pl.String}).with_row_index("doc")
        .select("doc", pl.col("t").fill_null("").str.to_lowercase().str.extract_all(r"\w+").alias("w"))
        .explode("w").drop_nulls("w")
    )
    vocab = words.select(pl.col("w").unique())
    con = duckdb.connect()
    con.register("vocab", vocab)
    hashed = pl.DataFrame(con.execute("SELECT w, md5_number_lower(w) AS h FROM vocab").fetchnumpy(),
                          schema={"w": pl.String, "h": pl.UInt64})
    joined = words.join(hashed, on="w", how="left", maintain_order="left")
    return joined["doc"].to_numpy().astype(np.int64), joined["h"].to_numpy().astype(np.uint64)


def _combine(columns: list[np.ndarray]) -> np.ndarray:
    acc = np.zeros_like(columns[0])
    with np.errstate(over="ignore"):
        for c in columns:
            acc = (acc ^ c) * FNV_PRIME
    return acc


def shingle_hashes(texts: list[str], ngram: int) -> tuple[np.ndarray, np.ndarray]:
    """(doc index per shingle, 64-bit hash of each word n-gram), grouped by document. A document
    shorter than `ngram` words is one shingle of all its words; a document without words has none."""
    doc, h = word_hashes(texts)
    if h.size == 0:
        return doc, h
    out_doc, out_h = [], []
    if h.size >= ngram:
        idx = np.arange(h.size - ngram + 1)
        valid = doc[idx] == doc[idx + ngram - 1]  # the n-gram stays inside one document
        idx = idx[valid]
        out_doc.append(doc[idx])
        out_h.append(_combine([h[idx + j] for j in range(ngram)]))
    counts = np.bincount(doc, minlength=len(texts))
    for d in np.flatnonzero((counts > 0) & (counts < ngram)):  # rare: very short documents
        out_doc.append(np.array([d], dtype=np.int64))
        out_h.append(_combine([np.array([v], dtype=np.uint64) for v in h[doc == d]]))
    order_doc = np.concatenate(out_doc)
    order = np.argsort(order_doc, kind="stable")
    return order_doc[order], np.concatenate(out_h)[order]


def minhash_signatures(texts: list[str], cfg: MinhashConfig) -> np.ndarray:
    """(len(texts), num_perm) uint32 MinHash signatures; rows of documents without words are all 0xFFFFFFFF."""
    n = len(texts)
    sig = np.full((cfg.num_perm, n), np.iinfo(np.uint32).max, dtype=np.uint32)
    if n == 0:
        return sig.T.copy()
    doc, h = shingle_hashes(texts, cfg.ngram)
    if h.size == 0:
        return sig.T.copy()
    starts = np.flatnonzero(np.r_[True, doc[1:] != doc[:-1]])
    present = doc[starts]
    a, b = _permutations(cfg)
    buf, tmp = np.empty_like(h), np.empty_like(h)
    # One permutation at a time, in place (~20x faster than broadcasting shingles x perms matrices):
    # xor a seed, multiply, xor-shift, multiply (a splitmix-style mixer), keep the top 32 bits.
    with np.errstate(over="ignore"):  # the mixer relies on uint64 wrap-around
        for p in range(cfg.num_perm):
            np.bitwise_xor(h, b[p], out=buf)
            buf *= a[p]
            np.right_shift(buf, np.uint64(29), out=tmp)
            buf ^= tmp
            buf *= MIX
            buf >>= np.uint64(32)
            sig[p, present] = np.minimum.reduceat(buf, starts)
    return sig.T.copy()


def band_keys(sig: np.ndarray, cfg: MinhashConfig) -> np.ndarray:
    """(n, bands) uint64 bucket keys: one hash of each band's `rows` signature values."""
    n = sig.shape[0]
    bands = sig.reshape(n, cfg.bands, cfg.rows).astype(np.uint64)
    key = np.zeros((n, cfg.bands), dtype=np.uint64)
    with np.errstate(over="ignore"):
        for r in range(cfg.rows):  # FNV-style mixing, vectorised over documents and bands
            key = (key ^ bands[:, :, r]) * np.uint64(0x100000001B3) + np.uint64(r + 1)
    return key


def signature_frame(doc_ids: list[str], texts: list[str], cfg: MinhashConfig) -> pl.DataFrame:
    """Per-document signature rows for one shard: doc_id, band keys, full signature."""
    sig = minhash_signatures(texts, cfg)
    keys = band_keys(sig, cfg)
    return pl.DataFrame({
        "doc_id": doc_ids,
        "band_keys": pl.Series(keys.tolist(), dtype=pl.List(pl.UInt64)),
        "signature": pl.Series(sig.tolist(), dtype=pl.List(pl.UInt32)),
    })


def cluster_duplicates(signatures: pl.DataFrame, cfg: MinhashConfig) -> pl.DataFrame:
    """Duplicate clusters over every shard's signatures (columns doc_id, shard, text_hash, band_keys,
    signature). Returns one row per document: kept, duplicate_of (the kept member), reason
    (exact_duplicate | near_duplicate | None) and the estimated similarity to the kept member."""
    n = signatures.height
    if n == 0:
        return pl.DataFrame(schema={"doc_id": pl.String, "shard": pl.String, "cluster": pl.Int64,
                                    "kept": pl.Boolean, "duplicate_of": pl.String, "reason": pl.String,
                                    "similarity": pl.Float32})
    repeated = signatures.filter(pl.col("doc_id").is_duplicated())
    if repeated.height:  # one id for two rows would give two decisions for it, and the join would multiply rows
        raise ValueError(f"{repeated['doc_id'].n_unique()} doc_ids have more than one signature row (e.g. "
                         f"{repeated['doc_id'][0]} in shard {repeated['shard'][0]}): re-materialize "
                         "filtered_documents for those shards")
    df = signatures.sort("doc_id").with_row_index("idx")
    edges: list[np.ndarray] = []
    # Exact duplicates share a normalised-text hash.
    exact = df.group_by("text_hash").agg(pl.col("idx")).filter(pl.col("idx").list.len() > 1)
    for members in exact["idx"].to_list():
        m = np.asarray(members, dtype=np.int64)
        edges.append(np.stack([np.full(len(m) - 1, m[0]), m[1:]], axis=1))
    # Near duplicates share an LSH bucket and pass the similarity check.
    sig = np.asarray(df["signature"].to_list(), dtype=np.uint32)
    keys = np.asarray(df["band_keys"].to_list(), dtype=np.uint64)
    for band in range(cfg.bands):
        order = np.lexsort((np.arange(n), keys[:, band]))
        k = keys[order, band]
        same = np.flatnonzero(k[1:] == k[:-1])
        if same.size == 0:
            continue
        # Link each member to the first member of its bucket run.
        run_start = np.maximum.accumulate(np.where(np.r_[True, k[1:] != k[:-1]], np.arange(n), 0))
        left, right = order[run_start[same + 1]], order[same + 1]
        sim = (sig[left] == sig[right]).mean(axis=1)
        ok = sim >= cfg.min_similarity
        edges.append(np.stack([left[ok], right[ok]], axis=1))
    pairs = np.concatenate(edges) if edges else np.zeros((0, 2), dtype=np.int64)
    graph = coo_matrix((np.ones(len(pairs), dtype=np.int8), (pairs[:, 0], pairs[:, 1])), shape=(n, n))
    _, labels = connected_components(graph, directed=False)
    # Rows are sorted by doc_id, so the first index of each component is its smallest doc_id.
    first = np.full(labels.max() + 1, n, dtype=np.int64)
    np.minimum.at(first, labels, np.arange(n))
    keeper = first[labels]
    idx = np.arange(n)
    kept = keeper == idx
    text_hash = df["text_hash"].to_numpy()
    same_text = text_hash == text_hash[keeper]
    similarity = (sig == sig[keeper]).mean(axis=1).astype(np.float32)
    doc_ids = df["doc_id"].to_numpy()
    reason = np.where(kept, None, np.where(same_text, "exact_duplicate", "near_duplicate"))
    return pl.DataFrame({
        "doc_id": doc_ids, "shard": df["shard"], "cluster": labels.astype(np.int64), "kept": kept,
        "duplicate_of": pl.Series(np.where(kept, None, doc_ids[keeper]).tolist(), dtype=pl.String),
        "reason": pl.Series(reason.tolist(), dtype=pl.String),
        "similarity": np.where(same_text, np.float32(1.0), similarity).astype(np.float32),
    })
