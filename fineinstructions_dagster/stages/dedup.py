"""Near-duplicate detection across corpus shards, in three steps that each bound their memory:

1. per shard (`shard_signatures`): MinHash signatures, and one *band row* per (band, document) with the band's
   key and a bucket number, sorted by bucket: compact integers (the doc_id's 64 bits), never strings;
2. per bucket range (`candidate_edges`): the range's band rows of every shard, read a few hundred thousand
   rows at a time, grouped by key; documents sharing a key become candidate edges, confirmed by the estimated
   Jaccard similarity of their signatures (fetched for the candidates only);
3. once (`decide_duplicates`): connected components over the confirmed edges only (memory grows with the
   number of duplicates, not documents) and one decision per document in a component.

Written by hand (not datasketch) because a per-batch vectorised pipeline is much faster than hashing
shingle by shingle in Python: DuckDB builds word 5-gram shingles and hashes them with MD5 (stable across
versions and machines, so signatures stored today still match signatures computed next year), NumPy
applies the permutations and takes per-document minima with `minimum.reduceat`, and SciPy finds the
connected components of the candidate graph. `benchmarks/documents.py` measures it against datatrove.

Two rules for who is kept (README, "Near-duplicate removal"): `stable` (default) never changes a decision
already made: documents of shards decided before keep their decisions, and a new shard's documents that
duplicate them are removed; `rebuild` decides from scratch over every shard, each cluster keeping its smallest
doc_id (a function of the set of shards, not of the order they ran in).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import duckdb
import numpy as np
import polars as pl
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from fineinstructions_dagster.lib.storage import ROW_GROUP_ROWS


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
    # Who is kept when a cluster spans shards: "stable" (decisions once made stay put) or "rebuild".
    keep: str = "stable"

    def __post_init__(self) -> None:
        if self.ngram < 1 or self.bands < 1 or self.rows < 1:
            raise ValueError(f"ngram, bands and rows must be >= 1: {self}")
        if self.bands >= EXACT_BAND:
            raise ValueError(f"at most {EXACT_BAND - 1} bands")
        if self.keep not in ("stable", "rebuild"):
            raise ValueError(f"minhash keep must be 'stable' or 'rebuild', got {self.keep!r}")
        if not 0.0 <= self.min_similarity <= 1.0:
            raise ValueError("min_similarity must be in [0, 1]")

    @property
    def num_perm(self) -> int:
        return self.bands * self.rows

    @property
    def version(self) -> str:
        """Signatures are comparable only under the same version string."""
        return f"minhash-md5-{self.ngram}g-{self.bands}x{self.rows}-s{self.seed}"


# Bucket numbers are the top bits of a band row's key: 65,536 buckets, split into BUCKET_RANGES ranges of equal
# size; each range is one partition of the bucket step (a static partition set, so a backfill spreads them).
BUCKET_BITS = 16
BUCKETS = 1 << BUCKET_BITS
BUCKET_RANGES = 16
EXACT_BAND = 255  # the band number of the exact-duplicate row (key = normalised-text hash)
# Band rows the bucket step holds at once (~17 bytes each plus a sort): its memory, whatever the corpus size.
BAND_CHUNK_ROWS = 500_000


def bucket_range_keys() -> list[str]:
    return [f"{i:02d}" for i in range(BUCKET_RANGES)]


def bucket_range(key: str) -> tuple[int, int]:
    """[lo, hi) bucket numbers of a bucket-range partition key ("00".."15")."""
    i = int(key)
    if not 0 <= i < BUCKET_RANGES:
        raise ValueError(f"bucket range {key!r} is not one of {bucket_range_keys()[0]}..{bucket_range_keys()[-1]}")
    width = BUCKETS // BUCKET_RANGES
    return i * width, (i + 1) * width


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


def _mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: every output bit depends on every input bit (bucket = top bits)."""
    with np.errstate(over="ignore"):
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))


def id_keys(ids: pl.Series) -> np.ndarray:
    """The 64 bits of content ids ("d" + 16 hex digits): the same order as the strings, 8 bytes each."""
    bad = ids.is_null() | (ids.str.len_bytes() != 17)
    if bad.any():
        raise ValueError(f"not a 64-bit content id: {ids.filter(bad)[0]!r}")
    return ids.str.slice(1).str.to_integer(base=16, dtype=pl.UInt64).to_numpy()


_HEX = np.frombuffer(b"0123456789abcdef", dtype=np.uint8)


def key_ids(keys: np.ndarray, kind: str = "d") -> pl.Series:
    """Back from 64-bit keys to content-id strings, vectorised (no Python string per row)."""
    keys = np.asarray(keys, dtype=np.uint64)
    chars = np.empty((keys.size, 17), dtype=np.uint8)
    chars[:, 0] = ord(kind)
    shifts = np.arange(60, -1, -4, dtype=np.uint64)
    chars[:, 1:] = _HEX[((keys[:, None] >> shifts) & np.uint64(15)).astype(np.intp)]
    return pl.Series(chars.view("S17").ravel(), dtype=pl.Binary).cast(pl.String)


BAND_SCHEMA = {"bucket": pl.UInt32, "band": pl.UInt8, "key": pl.UInt64, "doc_key": pl.UInt64}


SIGNATURE_SCHEMA: dict[str, pl.DataType] = {"doc_key": pl.UInt64(), "signature": pl.Binary()}


def signature_blobs(sig: np.ndarray) -> pl.Series:
    """(n, num_perm) uint32 -> one bytes value per row: Parquet decodes a blob ~5x faster than a list column,
    and the bucket step reads every shard's signatures once per bucket range."""
    import pyarrow as pa

    sig = np.ascontiguousarray(sig, dtype=np.uint32)
    n, width = sig.shape
    blobs = pa.FixedSizeBinaryArray.from_buffers(pa.binary(width * 4), n, [None, pa.py_buffer(sig.tobytes())])
    return pl.Series("signature", blobs).cast(pl.Binary)


def signature_matrix(blobs: pl.Series, num_perm: int) -> np.ndarray:
    """The inverse of `signature_blobs`; a blob of the wrong length names the signature version mismatch."""
    if blobs.len() == 0:
        return np.zeros((0, num_perm), dtype=np.uint32)
    lengths = blobs.bin.size()
    if (lengths != num_perm * 4).any():
        raise ValueError(f"signatures of {lengths.filter(lengths != num_perm * 4)[0] // 4} values, expected "
                         f"{num_perm}: written under another MinHash setting; re-materialize filtered_documents")
    arr = blobs.rechunk().to_arrow()
    offsets = np.frombuffer(arr.buffers()[1], dtype=np.int64 if "large" in str(arr.type) else np.int32)
    start = offsets[arr.offset]
    data = np.frombuffer(arr.buffers()[2], dtype=np.uint8)[start:start + len(arr) * num_perm * 4]
    return data.view(np.uint32).reshape(len(arr), num_perm)


def shard_signatures(doc_ids: pl.Series, text_hashes: pl.Series, texts: list[str],
                     cfg: MinhashConfig) -> tuple[pl.DataFrame, pl.DataFrame]:
    """One batch of a shard -> (signatures: doc_key + signature, band rows: bucket, band, key, doc_key)."""
    return signature_rows(id_keys(doc_ids), id_keys(text_hashes), minhash_signatures(texts, cfg), cfg)


def signature_rows(doc_key: np.ndarray, text_key: np.ndarray, sig: np.ndarray,
                   cfg: MinhashConfig) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Signatures (n, num_perm) of documents -> their signature rows and band rows, sorted by bucket.

    Each document gets one band row per LSH band (key = hash of the band number and its rows) and one for
    the exact band (key = hash of its normalised text), so exact and near duplicates meet in the same buckets.
    """
    n = doc_key.size
    keys = band_keys(sig, cfg)
    with np.errstate(over="ignore"):
        keys = _mix64(keys + np.arange(1, cfg.bands + 1, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15))
        exact = _mix64(text_key.astype(np.uint64) ^ np.uint64(0xD6E8FEB86659FD93))
    all_keys = np.concatenate([keys.reshape(-1), exact])
    bands = np.concatenate([np.tile(np.arange(cfg.bands, dtype=np.uint8), n), np.full(n, EXACT_BAND, np.uint8)])
    docs = np.concatenate([np.repeat(doc_key, cfg.bands), doc_key])
    rows = pl.DataFrame({"bucket": (all_keys >> np.uint64(64 - BUCKET_BITS)).astype(np.uint32), "band": bands,
                         "key": all_keys, "doc_key": docs}, schema=BAND_SCHEMA).sort("bucket", "key")
    signatures = pl.DataFrame({"doc_key": doc_key, "signature": signature_blobs(sig)}, schema=SIGNATURE_SCHEMA)
    return signatures, rows


def sort_band_rows(parts: Sequence[Path], target: Path | str, scratch: Path, memory_limit: str = "1GB") -> None:
    """Merge a shard's per-batch band rows into one file sorted by bucket, out of core: DuckDB spills to
    `scratch` past `memory_limit`. Row groups of ROW_GROUP_ROWS: the bucket step reads a chunk of buckets of
    every shard, a few thousand rows per shard, and row-group statistics let it skip the rest."""
    con = duckdb.connect(config={"memory_limit": memory_limit, "temp_directory": str(scratch / "duckdb-spill"),
                                 "preserve_insertion_order": False, "threads": 2})
    try:
        files = ", ".join(f"'{p}'" for p in parts)
        con.execute(f"COPY (SELECT * FROM read_parquet([{files}]) ORDER BY bucket, key) TO '{target}' "
                    f"(FORMAT parquet, COMPRESSION zstd, ROW_GROUP_SIZE {ROW_GROUP_ROWS})")
    finally:
        con.close()


def _bucket_chunks(band_files: Sequence[Path], lo: int, hi: int, chunk_rows: int) -> Iterator[tuple[int, int]]:
    """Sub-ranges of [lo, hi) holding about `chunk_rows` band rows each, from the files' row counts (bucket
    numbers are uniform hashes, so rows spread evenly over buckets). A chunk is never smaller than one row group
    per file: a smaller one would decode each row group several times to keep a few rows of it, so with many
    shards the chunk (and the step's memory) grows to shards x ROW_GROUP_ROWS rows."""
    import pyarrow.parquet as pq

    chunk_rows = max(chunk_rows, len(band_files) * ROW_GROUP_ROWS)
    total = sum(pq.ParquetFile(f).metadata.num_rows for f in band_files)
    in_range = total * (hi - lo) / BUCKETS
    step = max(1, math.floor((hi - lo) * chunk_rows / max(in_range, 1)))
    for a in range(lo, hi, step):
        yield a, min(hi, a + step)


def candidate_edges(band_files: Sequence[Path], lo: int, hi: int, chunk_rows: int = BAND_CHUNK_ROWS) -> pl.DataFrame:
    """Unconfirmed edges (a, b, exact) between documents that share a band key in buckets [lo, hi) of any shard.

    Each bucket group links its members to its smallest doc_key (a star: components are the same as with every
    pair, with n-1 edges instead of n(n-1)/2). Memory: one chunk of band rows plus the edges found."""
    found: list[pl.DataFrame] = []
    files = list(band_files)
    for a, b in _bucket_chunks(files, lo, hi, chunk_rows):
        # The streaming engine reads the row groups whose bucket statistics overlap [a, b) a few at a time: as
        # fast as the in-memory one and ~25 MB less at its peak with 64 shards (benchmarks/dedup_scale.py).
        # one file at a time: a scan over every shard at once holds read buffers per file, which grows with the
        # number of shards (the corpus), not with the chunk
        rows = pl.concat([pl.scan_parquet(f).filter(pl.col("bucket").is_between(a, b, closed="left"))
                          .select("key", "doc_key", "band").collect() for f in files])
        if rows.height < 2:
            continue
        key, doc, band = rows["key"].to_numpy(), rows["doc_key"].to_numpy(), rows["band"].to_numpy()
        del rows
        # Almost every key is unique: one plain sort of the keys finds the repeated ones, and only their rows
        # are grouped (a lexsort of the whole chunk by key and doc_key took twice as long as reading it).
        ordered = np.sort(key)
        repeated = ordered[1:][ordered[1:] == ordered[:-1]]
        del ordered
        if repeated.size == 0:
            continue
        repeated = np.unique(repeated)
        at = np.minimum(np.searchsorted(repeated, key), repeated.size - 1)
        sel = np.flatnonzero(repeated[at] == key)
        del at
        key, doc, band = key[sel], doc[sel], band[sel]
        order = np.lexsort((doc, key))
        key, doc, band = key[order], doc[order], band[order]
        same = key[1:] == key[:-1]
        n = key.size
        run_start = np.maximum.accumulate(np.where(np.r_[True, ~same], np.arange(n), 0))
        right = np.flatnonzero(same) + 1
        left = run_start[right]
        ok = doc[left] != doc[right]  # a document whose two bands collide is not its own duplicate
        found.append(pl.DataFrame({"a": doc[left[ok]], "b": doc[right[ok]], "exact": band[right[ok]] == EXACT_BAND}))
    if not found:
        return pl.DataFrame(schema={"a": pl.UInt64, "b": pl.UInt64, "exact": pl.Boolean})
    return pl.concat(found).group_by("a", "b").agg(pl.col("exact").any())


def confirm_edges(edges: pl.DataFrame, signature_files: Mapping[str, Path], cfg: MinhashConfig) -> pl.DataFrame:
    """Keep the candidate edges whose documents' signatures agree on at least `min_similarity` of their values
    (exact-text edges always). Signatures are read for the candidates' documents only; each end gets its shard.
    Returns a, b (doc keys, a < b), a_shard, b_shard, similarity, exact."""
    schema = {"a": pl.UInt64, "b": pl.UInt64, "a_shard": pl.String, "b_shard": pl.String,
              "similarity": pl.Float32, "exact": pl.Boolean}
    if edges.height == 0:
        return pl.DataFrame(schema=schema)
    ea, eb = edges["a"].to_numpy(), edges["b"].to_numpy()
    shards = sorted(signature_files)

    def read(keys: np.ndarray) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
        """Per shard (in name order): positions in `keys` of the documents found and their signatures, each
        document once: its first row in its first shard."""
        wanted = pl.Series("doc_key", keys, dtype=pl.UInt64).implode()
        seen = np.zeros(keys.size, dtype=bool)
        for s, shard in enumerate(shards):
            hit = (pl.scan_parquet(signature_files[shard]).filter(pl.col("doc_key").is_in(wanted))
                   .select("doc_key", "signature").collect())
            at, first = np.unique(np.searchsorted(keys, hit["doc_key"].to_numpy()), return_index=True)
            new = ~seen[at]
            at, first = at[new], first[new]
            seen[at] = True
            if at.size:
                yield s, at, signature_matrix(hit["signature"], cfg.num_perm)[first]

    # Two passes over the shards' signatures instead of one: the first keeps the signatures of the edges' `a`
    # ends (a star's centre, so fewer documents), the second compares each `b` end with them as it is read.
    # Reading every shard's signature column is the cost of this step; memory is the centres' signatures only.
    a_keys, ia = np.unique(ea, return_inverse=True)
    sig_a = np.empty((a_keys.size, cfg.num_perm), dtype=np.uint32)
    shard_a = np.full(a_keys.size, -1, dtype=np.int64)
    for s, at, sig in read(a_keys):
        sig_a[at], shard_a[at] = sig, s
    b_keys, ib = np.unique(eb, return_inverse=True)
    by_b = np.argsort(ib, kind="stable")  # edges grouped by their b end: by_b[start[j]:start[j + 1]]
    start = np.searchsorted(ib[by_b], np.arange(b_keys.size + 1))
    shard_b = np.full(b_keys.size, -1, dtype=np.int64)
    sim = np.zeros(ea.size, dtype=np.float32)
    have_a = shard_a[ia] >= 0
    step = 1 << 12  # edges at a time: two small (step, num_perm) gathers
    for s, at, sig in read(b_keys):
        shard_b[at] = s
        count = start[at + 1] - start[at]
        owner = np.repeat(np.arange(at.size), count)  # row of `sig` of each edge below
        edge = by_b[np.repeat(start[at], count) + np.arange(owner.size) - np.repeat(np.cumsum(count) - count, count)]
        keep = have_a[edge]
        edge, owner = edge[keep], owner[keep]
        for i in range(0, edge.size, step):
            e = edge[i:i + step]
            sim[e] = (sig[owner[i:i + step]] == sig_a[ia[e]]).mean(axis=1)
    present = have_a & (shard_b[ib] >= 0)
    if not present.all():  # band rows without signatures: the two tables of a shard were not written together
        missing = edges.filter(~pl.Series(present)).head(1)
        raise ValueError(f"document {key_ids(missing['a'].to_numpy())[0]} has band rows but no signature: "
                         "re-materialize filtered_documents for its shard")
    exact = edges["exact"].to_numpy()
    ok = exact | (sim >= cfg.min_similarity)
    ka, kb, sa, sb = ea[ok], eb[ok], shard_a[ia[ok]], shard_b[ib[ok]]
    swap = kb < ka  # a < b in the result, each end with its own shard
    names = pl.Series(shards, dtype=pl.String)
    return pl.DataFrame({"a": np.where(swap, kb, ka), "b": np.where(swap, ka, kb),
                         "a_shard": names.gather(np.where(swap, sb, sa)),
                         "b_shard": names.gather(np.where(swap, sa, sb)),
                         "similarity": np.where(exact[ok], np.float32(1.0), sim[ok]), "exact": exact[ok]},
                        schema=schema).sort("a", "b")


DECISION_SCHEMA: dict[str, pl.DataType] = {
    "doc_id": pl.String(), "shard": pl.String(), "cluster": pl.String(), "kept": pl.Boolean(),
    "duplicate_of": pl.String(), "duplicate_of_shard": pl.String(), "reason": pl.String(),
    "similarity": pl.Float32(),
}


def _merge_edges(frames: Iterable[pl.DataFrame], names: list[str]) -> tuple[np.ndarray, ...]:
    """Every range's edges -> one row per document pair (a, b, similarity: the max, exact: any, a's and b's
    shard codes into `names`), merged one range at a time: memory follows the distinct pairs, not the edge
    rows of all ranges (the same pair meets in several bands, so in several ranges)."""
    acc: tuple[np.ndarray, ...] | None = None
    for frame in frames:
        if frame.height == 0:
            continue
        codes = [frame[c].cast(pl.Enum(names)).to_physical().cast(pl.UInt32).fill_null(len(names)).to_numpy()
                 for c in ("a_shard", "b_shard")]
        cols = (frame["a"].to_numpy(), frame["b"].to_numpy(), frame["similarity"].to_numpy(),
                frame["exact"].to_numpy(), *codes)
        if acc is not None:  # earlier rows first: the stable sort keeps "first" meaning first seen
            cols = tuple(np.concatenate([x, y]) for x, y in zip(acc, cols, strict=True))
        a, b, sim, exact, sa, sb = cols
        order = np.lexsort((b, a))
        a, b = a[order], b[order]
        starts = np.flatnonzero(np.r_[True, (a[1:] != a[:-1]) | (b[1:] != b[:-1])])
        acc = (a[starts], b[starts], np.fmax.reduceat(sim[order], starts),
               np.logical_or.reduceat(exact[order], starts), sa[order][starts], sb[order][starts])
    return acc if acc is not None else ()


def decide_duplicates(edges: pl.DataFrame | Iterable[pl.DataFrame], cfg: MinhashConfig,
                      prior: pl.DataFrame | None = None, decided_shards: set[str] | frozenset[str] = frozenset(),
                      shards: Sequence[str] | None = None, removed_only: bool = False) -> pl.DataFrame:
    """Connected components over confirmed edges -> one decision row per document in a component (documents
    without a duplicate have no row: kept). `edges`: one table, or one per bucket range (read lazily, merged
    one at a time; then `shards` must name every shard the edges can name). Memory follows the number of
    distinct duplicate pairs, not of documents nor of edge rows.

    `prior` (DECISION_SCHEMA rows) and `decided_shards`: the decisions of shards decided before, kept as they
    are under the `stable` rule: their documents stay kept (or removed), and a new shard's document in a cluster
    with one of them is removed as a duplicate of the smallest such kept document. Clusters of new documents
    only, and every cluster under `rebuild`, keep their smallest doc_id. `cluster` is that keeper's doc_id.
    `removed_only`: the removal rows alone (what the pipeline stores; half the rows and strings)."""
    if isinstance(edges, pl.DataFrame):
        if shards is None:
            shards = pl.concat([edges["a_shard"], edges["b_shard"]]).drop_nulls().unique().to_list()
        edges = [edges]
    elif shards is None:
        raise ValueError("decide_duplicates over several edge tables needs `shards`")
    # Shards as small integer codes into `names`, not a Python string per edge end and per document.
    names = sorted(shards)
    shard_names = pl.Series([*names, None], dtype=pl.String)  # the last code: an edge end without a shard
    merged = _merge_edges(edges, names)
    if not merged or merged[0].size == 0:
        return pl.DataFrame(schema=DECISION_SCHEMA)
    a, b, similarity, exact, sa, sb = merged
    del merged
    keys, inverse = np.unique(np.concatenate([a, b]), return_inverse=True)
    n = keys.size
    ia, ib = inverse[: a.size], inverse[a.size:]
    shard = np.empty(n, dtype=np.uint32)
    shard[ia], shard[ib] = sa, sb
    del a, b, sa, sb, inverse
    _, labels = connected_components(coo_matrix((np.ones(ia.size, np.int8), (ia, ib)), shape=(n, n)), directed=False)
    _, exact_labels = connected_components(coo_matrix((np.ones(int(exact.sum()), np.int8), (ia[exact], ib[exact])),
                                                      shape=(n, n)), directed=False)
    idx = np.arange(n)
    # Under `stable`: documents of decided shards are pinned to their earlier decision.
    pinned = np.zeros(n, dtype=bool)
    pinned_kept = np.zeros(n, dtype=bool)
    if cfg.keep == "stable" and decided_shards:
        pinned = np.isin(shard, [i for i, s in enumerate(names) if s in decided_shards])
        removed_before = np.zeros(n, dtype=bool)
        if prior is not None and prior.height:
            gone = prior.filter(~pl.col("kept") & pl.col("shard").is_in(list(decided_shards)))
            removed_before = np.isin(keys, id_keys(gone["doc_id"]))
        pinned_kept = pinned & ~removed_before
    # Keeper of each component: its smallest pinned-kept document, else its smallest document (keys are sorted,
    # so the smallest index is the smallest doc_id).
    big = np.int64(n)
    first_pinned = np.full(labels.max() + 1, big)
    np.minimum.at(first_pinned, labels[pinned_kept], idx[pinned_kept])
    first_any = np.full(labels.max() + 1, big)
    np.minimum.at(first_any, labels[~pinned], idx[~pinned])
    keeper = np.where(first_pinned[labels] < big, first_pinned[labels], first_any[labels])
    kept = np.where(pinned, pinned_kept, keeper == idx)
    # Similarity to the keeper where the two share an edge (a star links most members to it directly).
    to_keeper = np.full(n, np.nan)
    for i, j in ((ia, ib), (ib, ia)):
        direct = keeper[i] == j
        np.fmax.at(to_keeper, i[direct], similarity[direct])
    same_text = exact_labels == exact_labels[keeper]
    rows = np.flatnonzero(~kept) if removed_only else idx  # the removal list only, or every document in a cluster

    def ids(at: np.ndarray) -> pl.Series:
        step = 1 << 15  # a block at a time: key_ids' temporaries are ~250 bytes per key
        return pl.concat([key_ids(keys[at[i:i + step]]) for i in range(0, at.size, step)]
                         or [pl.Series([], dtype=pl.String)]).rechunk()

    removed = ~pl.col("kept")
    out = pl.DataFrame({
        "doc_id": ids(rows), "shard": shard_names.gather(shard[rows]), "cluster": ids(keeper[rows]),
        "kept": kept[rows], "keeper_shard": shard_names.gather(shard[keeper[rows]]),
        "same_text": same_text[rows], "to_keeper": to_keeper[rows],
    }).select(
        "doc_id", "shard", "cluster", "kept",
        pl.when(removed).then(pl.col("cluster")).alias("duplicate_of"),
        pl.when(removed).then(pl.col("keeper_shard")).alias("duplicate_of_shard"),
        pl.when(removed).then(pl.when(pl.col("same_text")).then(pl.lit("exact_duplicate"))
                              .otherwise(pl.lit("near_duplicate"))).alias("reason"),
        pl.when(removed).then(pl.when(pl.col("same_text")).then(1.0).otherwise(pl.col("to_keeper")))
        .cast(pl.Float32).fill_nan(None).alias("similarity"),
    ).cast(DECISION_SCHEMA)
    if prior is not None and prior.height and cfg.keep == "stable":
        # A pinned document's row is its earlier one (same duplicate_of, reason, similarity), not a new guess.
        old = prior.filter(pl.col("shard").is_in(list(decided_shards)))
        out = pl.concat([out.filter(~pl.col("doc_id").is_in(old["doc_id"].implode())),
                         old.filter(pl.col("doc_id").is_in(out["doc_id"].implode()))]).sort("doc_id")
    return out


def range_edges(band_files: Mapping[str, Path], signature_files: Mapping[str, Path], range_key: str,
                cfg: MinhashConfig, chunk_rows: int = BAND_CHUNK_ROWS) -> pl.DataFrame:
    """The bucket step for one bucket range: confirmed edges between documents of any shard."""
    lo, hi = bucket_range(range_key)
    return confirm_edges(candidate_edges([band_files[s] for s in sorted(band_files)], lo, hi, chunk_rows),
                         signature_files, cfg)


def dedup_in_one_process(shards: Mapping[str, tuple[Sequence[Path], Sequence[Path]]], scratch: Path,
                         cfg: MinhashConfig, prior: pl.DataFrame | None = None,
                         decided_shards: set[str] | frozenset[str] = frozenset()) -> pl.DataFrame:
    """The three steps in one process, for tests and small corpora: `shards` maps each shard to its
    (signature part files, band part files) as the filter step writes them."""
    bands, signatures = {}, {}
    for shard, (sig_parts, band_parts) in shards.items():
        folder = scratch / f"dedup-{shard}"
        folder.mkdir(parents=True, exist_ok=True)
        bands[shard] = folder / "bands.parquet"
        if band_parts:
            sort_band_rows(list(band_parts), bands[shard], folder)
        else:
            pl.DataFrame(schema=BAND_SCHEMA).write_parquet(bands[shard])
        signatures[shard] = folder / "signatures.parquet"
        frames = [pl.read_parquet(p) for p in sig_parts]
        (pl.concat(frames) if frames else pl.DataFrame(schema=SIGNATURE_SCHEMA)).write_parquet(signatures[shard])
    edges = (range_edges(bands, signatures, r, cfg) for r in bucket_range_keys())
    return decide_duplicates(edges, cfg, prior, decided_shards, shards=sorted(shards))
