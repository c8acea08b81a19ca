"""Benchmark decontamination: word n-gram overlap with benchmark items, where data enters (queries, templates,
corpus documents) and where it leaves (the final pairs' instructions and answers).

A text is contaminated when it shares one normalised word n-gram (13 words by default, as NeMo Curator's task
decontamination and the GPT-3 paper use) with an item of a benchmark. Normalisation: lower case, every separator
character (whitespace and punctuation, `SEPARATORS`) a word boundary. The same normalisation is written in SQL for
the dbt test over the exported pairs (dbt_quality/tests/generic/no_benchmark_overlap.sql, given `SEPARATOR_CLASS`
as a var), so both sides agree on what an n-gram is.

The lookup is a hash join: every n-gram of a batch of texts is hashed from its words' hashes (Polars hashes the
words, numpy rolls them into n-gram hashes; no Python per row), tested against a bitmap of the benchmark hashes
(numpy: one gather per n-gram, so that the exact join only sees the few per cent that may match), then joined
with the benchmark's n-gram hashes. The word hashes are Polars' and stable only within one Polars version, so the
stored table records the scheme it was hashed under (and the benchmarks' settings version includes it).
"""

from __future__ import annotations

import functools
import io
import json
import string
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.json as pajson

from fineinstructions_dagster.lib.formats import InputFormatError
from fineinstructions_dagster.lib.stats import StageStats

DEFAULT_NGRAM = 13
# Word boundaries: whitespace, ASCII punctuation and the common Unicode quotes, dashes, ellipsis and spaces.
SEPARATORS = tuple(string.whitespace + string.punctuation) + ("“", "”", "‘", "’", "«", "»", "—", "–", "…", "\u00a0",
                                                              "\u2009", "\u200b", "\u3000", "、", "。", "，")
# The separators as one RE2 character class of \x{..} escapes (no quote or brace to escape in SQL or Jinja): the
# dbt test's normalisation (var benchmark_separators).
SEPARATOR_CLASS = "[" + "".join(f"\\x{{{ord(c):x}}}" for c in SEPARATORS) + "]"
# Fields holding an item's text, found by name as the corpus reader finds its text column; string columns only.
ITEM_TEXT_FIELDS = ("prompt", "question", "problem", "instruction", "input", "query", "context", "passage", "text",
                    "answer", "solution", "canonical_solution", "output", "response", "completion", "target")
ITEM_ID_FIELDS = ("task_id", "id", "question_id", "problem_id", "qid", "uid", "idx")
BENCHMARK_SUFFIXES = (".jsonl", ".jsonl.gz", ".json", ".json.gz", ".ndjson", ".parquet", ".arrow")
NGRAM_SCHEMA = {"ngram_hash": pl.UInt64(), "benchmark": pl.String(), "item_id": pl.String(), "field": pl.String(),
                "ngram": pl.String(), "hash_scheme": pl.String()}
OVERLAP_COLUMNS = {"benchmark": pl.String(), "benchmark_item": pl.String(), "benchmark_ngram": pl.String()}
_WORD_SEED = 0x5EED
# An n-gram's hash is a polynomial in its words' hashes, sum(h_j * B^j) mod 2^64 (order matters); B is odd.
_BASE = 0x9E3779B97F4A7C15
_BASE_INVERSE = pow(_BASE, -1, 1 << 64)
_BITMAP_BITS = 28  # 32 MiB: a few per cent false candidates at 10M benchmark n-grams
_ROWS_PER_THREAD = 5_000  # below this a thread's start costs more than it saves


def hash_scheme(n: int) -> str:
    """What the stored hashes mean: the n and the Polars version that hashed the words."""
    return f"polars-{pl.__version__}/n={n}/seed={_WORD_SEED}/poly"


def words_expr(col: str) -> pl.Expr:
    """The normalised words of a text column, as a list column (for small tables; `ngram_hashes` is the fast
    path and splits the same way)."""
    return (pl.col(col).fill_null("").str.to_lowercase()
            .str.replace_many(list(SEPARATORS), [" "] * len(SEPARATORS)).str.split(" ")
            .list.eval(pl.element().filter(pl.element() != "")))


_NON_ASCII_SEPARATORS = [s for s in SEPARATORS if not s.isascii()]
# byte -> byte: ASCII separators to a space, ASCII capitals to lower case, every other byte as it is
_ASCII_MAP = bytes(32 if b < 128 and chr(b) in SEPARATORS else ord(chr(b).lower()) if 65 <= b <= 90 else b
                   for b in range(256))


def _separators_to_spaces(texts: pl.Series) -> pl.Series:
    """Lower case, every separator a space. Over the UTF-8 buffer with `bytes.translate` (written by hand: 20x
    faster than a regex or Aho-Corasick pass over the column; no ASCII byte occurs inside a multi-byte character,
    so the text stays valid UTF-8); rows with non-ASCII characters (Unicode lower case, the non-ASCII separators)
    first through Polars."""
    texts = texts.fill_null("")
    arr = _large_string(texts)
    validity, offsets, data = arr.buffers()
    if data is None:  # only empty strings
        return texts
    raw = np.frombuffer(data, dtype=np.uint8)
    bounds = np.frombuffer(offsets, dtype=np.int64)[arr.offset: arr.offset + len(arr) + 1]
    high = np.flatnonzero(raw[bounds[0]: bounds[-1]] >= 128) + bounds[0]
    if high.size:  # the rows holding a non-ASCII byte
        rows = np.unique(np.searchsorted(bounds, high, side="right") - 1)
        fixed = (texts.gather(rows).str.to_lowercase()
                 .str.replace_many(_NON_ASCII_SEPARATORS, [" "] * len(_NON_ASCII_SEPARATORS)))
        texts = texts.scatter(rows, fixed)
        arr = _large_string(texts)
        validity, offsets, data = arr.buffers()
    mapped = data.to_pybytes().translate(_ASCII_MAP)
    out = pl.from_arrow(pa.LargeStringArray.from_buffers(len(arr), offsets, pa.py_buffer(mapped), validity,
                                                         offset=arr.offset))
    assert isinstance(out, pl.Series)
    return out


def _large_string(texts: pl.Series) -> pa.LargeStringArray:
    arr = texts.to_arrow()
    if isinstance(arr, pa.ChunkedArray):
        arr = arr.combine_chunks()
    return arr.cast(pa.large_string())


def _powers(base: int, count: int) -> np.ndarray:
    """base^0 .. base^(count-1) mod 2^64 (numpy's unsigned products wrap)."""
    out = np.full(count, base, dtype=np.uint64)
    if count:
        out[0] = 1
    return np.cumprod(out, dtype=np.uint64)


_BLOCK = 1 << 16  # words per prefix sum: the powers' table stays small (and in cache) whatever the batch


@functools.lru_cache(maxsize=8)
def _block_powers(n: int) -> tuple[np.ndarray, np.ndarray]:
    return _powers(_BASE, _BLOCK + n - 1), _powers(_BASE_INVERSE, _BLOCK)


def _rolling(h: np.ndarray, n: int) -> np.ndarray:
    """The hash of every window of n consecutive word hashes, sum(h[i+j] * B^j) mod 2^64, from prefix sums
    (written by hand: 3 passes over the words instead of 2n shifted products): (P[i+n] - P[i]) * B^-i, B odd and so
    invertible mod 2^64; block by block, so that i stays below _BLOCK."""
    count = h.size - n + 1
    out = np.empty(max(count, 0), dtype=np.uint64)
    up, down = _block_powers(n)
    for start in range(0, max(count, 0), _BLOCK):
        seg = h[start: start + _BLOCK + n - 1]
        m = seg.size - n + 1
        prefix = np.zeros(seg.size + 1, dtype=np.uint64)
        np.cumsum(seg * up[: seg.size], out=prefix[1:])
        out[start: start + m] = (prefix[n:] - prefix[:m]) * down[:m]
    return out


def _ngrams(texts: pl.Series, n: int) -> tuple[pl.DataFrame, np.ndarray, np.ndarray]:
    """(the words: _i (row), _w; the n-gram hashes, one per word that starts a window of n words, windows that
    cross rows included; whether each window is within one row)."""
    words = (pl.DataFrame({"_i": pl.int_range(texts.len(), dtype=pl.UInt32, eager=True),
                           "_w": _separators_to_spaces(texts).str.split(" ")})
             .explode("_w").filter(pl.col("_w") != ""))
    row = words["_i"].to_numpy()
    grams = _rolling(words["_w"].hash(_WORD_SEED).to_numpy(), n)
    return words, grams, row[n - 1:] == row[: grams.size]


def ngram_hashes(df: pl.DataFrame, col: str, key: str, n: int, with_text: bool = False) -> pl.DataFrame:
    """Every n-gram of `col` per row: (key, ngram_hash[, ngram]). Rows with fewer than n words have none."""
    words, grams, within = _ngrams(df[col], n)
    row = words["_i"].to_numpy()[: grams.size][within]
    out = pl.DataFrame({"_i": row, "ngram_hash": grams[within]})
    if with_text:
        text = words.select(pl.concat_str([pl.col("_w").shift(-j) for j in range(n)], separator=" ")
                            .alias("ngram")).head(grams.size).filter(pl.Series(within))
        out = out.with_columns(text["ngram"])
    return out.select(df[key].gather(out["_i"]).alias(key), "ngram_hash", *(["ngram"] if with_text else []))


def benchmark_name(path: str) -> str:
    """HumanEval.jsonl.gz -> HumanEval."""
    name = path.rstrip("/").rsplit("/", 1)[-1]
    for suffix in sorted(BENCHMARK_SUFFIXES, key=len, reverse=True):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def _read_table(path: str, data: bytes) -> pa.Table:
    name = path.lower()
    if name.endswith(".parquet"):
        import pyarrow.parquet as pq

        return pq.read_table(io.BytesIO(data))
    if name.endswith(".arrow"):  # `datasets.save_to_disk` writes Arrow IPC streams
        return pa.ipc.open_stream(io.BytesIO(data)).read_all()
    if name.endswith(".gz"):
        import gzip

        data = gzip.decompress(data)
    if data.lstrip()[:1] == b"[":  # a JSON array (`to_json(lines=False)`): small, parsed whole
        return pa.Table.from_pylist(json.loads(data))
    return pajson.read_json(io.BytesIO(data))


def read_benchmark(name: str, files: list[tuple[str, bytes]]) -> tuple[pl.DataFrame, dict[str, int]]:
    """One benchmark's items, one row per (item, text field): (benchmark, item_id, field, text); and counts
    (items, texts). Raises InputFormatError naming the file when it cannot be read or has no text field."""
    frames = []
    items = 0
    for path, data in files:
        try:
            table = _read_table(path, data)
        except (pa.ArrowInvalid, json.JSONDecodeError, OSError, EOFError) as e:
            raise InputFormatError(f"{path}: cannot read benchmark file: {e}") from e
        df = pl.from_arrow(table)
        assert isinstance(df, pl.DataFrame)
        fields = [c for c in ITEM_TEXT_FIELDS if c in df.columns and df.schema[c] == pl.String]
        if not fields:
            raise InputFormatError(f"{path}: no text field in benchmark {name!r}; expected a string column named one "
                                   f"of {', '.join(ITEM_TEXT_FIELDS)}, found {', '.join(df.columns)}")
        id_col = next((c for c in ITEM_ID_FIELDS if c in df.columns), None)
        ids = (pl.col(id_col).cast(pl.String) if id_col else
               pl.format("{}:{}", pl.lit(Path(path).name), pl.int_range(1, pl.len() + 1)))
        frames.append(df.select(ids.alias("item_id"), *fields)
                      .unpivot(index="item_id", on=fields, variable_name="field", value_name="text")
                      .drop_nulls("text"))
        items += df.height
    out = (pl.concat(frames) if frames else pl.DataFrame(schema={"item_id": pl.String, "field": pl.String,
                                                                 "text": pl.String}))
    return out.select(pl.lit(name).alias("benchmark"), "item_id", "field", "text"), {"items": items,
                                                                                   "texts": out.height}


def build_benchmark_ngrams(texts: pl.DataFrame, n: int = DEFAULT_NGRAM) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Benchmark texts (benchmark, item_id, field, text) -> (their distinct n-grams, NGRAM_SCHEMA; the texts
    shorter than n words, which no n-gram can find: benchmark, item_id, field, words)."""
    keyed = texts.with_row_index("_row")
    grams = ngram_hashes(keyed, "text", "_row", n, with_text=True)
    out = (grams.join(keyed.select("_row", "benchmark", "item_id", "field"), on="_row")
           .unique(["ngram_hash", "benchmark", "item_id"], keep="first", maintain_order=True)
           .with_columns(pl.lit(hash_scheme(n)).alias("hash_scheme")).select(list(NGRAM_SCHEMA)))
    short = (keyed.join(grams.select("_row").unique(), on="_row", how="anti")
             .select("benchmark", "item_id", "field", words_expr("text").list.len().alias("words")))
    return out, short


@dataclass
class BenchmarkIndex:
    """The benchmark n-gram hashes, ready for lookups: a bitmap of their top bits to discard most n-grams of a
    text with one gather, and per distinct hash the first item that has it (benchmark, item id; not the n-gram's
    text, the largest column: a lookup takes it from the text it found it in)."""

    n: int
    items: pl.DataFrame  # ngram_hash (distinct), benchmark, benchmark_item
    bitmap: np.ndarray

    @classmethod
    def build(cls, ngrams: pl.DataFrame | pl.LazyFrame, n: int) -> BenchmarkIndex:
        lazy = ngrams.lazy()
        schemes = lazy.select(pl.col("hash_scheme").unique()).collect()["hash_scheme"].to_list()
        if schemes and schemes != [hash_scheme(n)]:
            raise ValueError(f"benchmark_ngrams was hashed as {schemes}, this process hashes as {hash_scheme(n)} "
                             "(another Polars version or n-gram size): re-materialize benchmark_ngrams")
        # one item per hash, the first in the table's order (build_benchmark_ngrams writes it deterministically)
        items = (lazy.select("ngram_hash", pl.col("benchmark").cast(pl.Categorical),
                             pl.col("item_id").cast(pl.Categorical).alias("benchmark_item"))
                 .unique("ngram_hash", keep="first").collect())
        bitmap = np.zeros(1 << (_BITMAP_BITS - 3), dtype=np.uint8)
        top = items["ngram_hash"].to_numpy() >> np.uint64(64 - _BITMAP_BITS)
        np.bitwise_or.at(bitmap, (top >> np.uint64(3)).astype(np.int64),
                         np.left_shift(1, (top & np.uint64(7)).astype(np.uint8)).astype(np.uint8))
        return cls(n, items, bitmap)

    @classmethod
    def empty(cls, n: int = DEFAULT_NGRAM) -> BenchmarkIndex:
        return cls.build(pl.DataFrame(schema=NGRAM_SCHEMA), n)

    def __len__(self) -> int:
        return self.items.height

    def _maybe(self, hashes: np.ndarray) -> np.ndarray:
        """Whether each hash may be a benchmark's: its top bits' bit in the bitmap (no false negatives)."""
        top = hashes >> np.uint64(64 - _BITMAP_BITS)
        return ((self.bitmap[(top >> np.uint64(3)).astype(np.intp)] >> (top & np.uint64(7)).astype(np.uint8))
                & 1).astype(bool)

    def _first_hits(self, rows: pl.DataFrame, col: str) -> pl.DataFrame:
        """Per row of `rows` (by `_r`) whose `col` has an n-gram of a benchmark, the first: _r, _pos (its place in
        the row), benchmark, benchmark_item, benchmark_ngram (its words). The bitmap filters the n-grams before any
        frame is built of them; the text is cut from the words already split."""
        words, grams, within = _ngrams(rows[col], self.n)
        pos = np.flatnonzero(within & self._maybe(grams))
        cands = pl.DataFrame({"_pos": pos, "_r": rows["_r"].gather(words["_i"].gather(pos)),
                              "ngram_hash": grams[pos]})
        # the (small) candidates are the join's build side; the benchmark hashes probe it
        hits = (self.items.join(cands, on="ngram_hash", how="inner") if cands.height else
                cands.join(self.items, on="ngram_hash", how="inner"))
        first = hits.sort("_pos").unique("_r", keep="first", maintain_order=True)
        at = (first["_pos"].to_numpy()[:, None] + np.arange(self.n)).ravel()  # the window's n words
        text = words["_w"].gather(at).reshape((first.height, self.n)).arr.join(" ")
        return first.select("_r", "_pos", "benchmark", "benchmark_item", text.alias("benchmark_ngram"))

    def first_overlaps(self, df: pl.DataFrame, columns: Iterable[str], key: str) -> pl.DataFrame:
        """Per row of `df` (identified by `key`, unique) that shares an n-gram with a benchmark in any of
        `columns` (checked separately: no n-gram spans two columns), its first one: key, benchmark,
        benchmark_item, benchmark_ngram. Rows without overlap are absent."""
        columns = list(columns)
        schema = {key: df.schema[key], **OVERLAP_COLUMNS}
        if not len(self) or df.height == 0:
            return pl.DataFrame(schema=schema)
        # rows by an integer index: n-gram boundaries are found by comparing it, cheaper than a string key
        rows = df.select(pl.int_range(pl.len(), dtype=pl.UInt32).alias("_r"), key, *columns)
        # Polars splits one string column on one thread: slices of rows on every thread (1.6x on 2 cores)
        k = max(1, min(pl.thread_pool_size(), rows.height // _ROWS_PER_THREAD))
        step = -(-rows.height // k)
        slices = [rows.slice(i * step, step) for i in range(k)]
        found = []
        with ThreadPoolExecutor(k) as pool:
            for order, col in enumerate(columns):
                for hits in pool.map(lambda part, c=col: self._first_hits(part, c), slices):
                    if hits.height:
                        found.append(hits.with_columns(pl.lit(order).alias("_col")))
        if not found:
            return pl.DataFrame(schema=schema)
        # per row, its first overlap: the first column, then the first position in the row
        first = pl.concat(found).sort("_col", "_r", "_pos").unique("_r", keep="first", maintain_order=True)
        return (first.join(rows.select("_r", key), on="_r", how="left").sort("_r")
                .select(key, pl.col("benchmark").cast(pl.String), pl.col("benchmark_item").cast(pl.String),
                        "benchmark_ngram"))


def mark_overlaps(df: pl.DataFrame, index: BenchmarkIndex, columns: Iterable[str], key: str,
                  only: pl.Expr | None = None) -> pl.DataFrame:
    """`df` with OVERLAP_COLUMNS: the first benchmark n-gram each row shares (null where none); only rows where
    `only` holds are looked up (e.g. those no cheaper rule rejected)."""
    todo = df.filter(only) if only is not None else df
    found = index.first_overlaps(todo, columns, key)
    return df.drop([c for c in OVERLAP_COLUMNS if c in df.columns]).join(found, on=key, how="left",
                                                                       maintain_order="left")


OVERLAP_REASON = "benchmark_overlap"


def remove_overlaps(kept: pl.DataFrame, index: BenchmarkIndex | None, columns: Iterable[str], key: str,
                    stats: StageStats | None = None) -> tuple[pl.DataFrame, pl.DataFrame]:
    """(the rows of `kept` that share no n-gram with a benchmark, in their order; the others with `reason`
    benchmark_overlap and OVERLAP_COLUMNS: the benchmark, item id and n-gram of the first overlap). `key`: a
    column unique in `kept`. `stats` (the stage's, already balanced): those rows move from kept to dropped, and
    their count per benchmark goes to its extra entries. No index: nothing removed."""
    if index is None or kept.height == 0:
        return kept, kept.clear().with_columns(pl.lit(None, pl.String).alias("reason"),
                                               *[pl.lit(None, t).alias(c) for c, t in OVERLAP_COLUMNS.items()])
    found = index.first_overlaps(kept, columns, key)
    removed = kept.join(found, on=key, how="inner", maintain_order="left").with_columns(
        pl.lit(OVERLAP_REASON).alias("reason"))
    clean = kept.join(found.select(key), on=key, how="anti", maintain_order="left")
    if stats is not None:
        stats.kept -= removed.height
        stats.drop(OVERLAP_REASON, removed.height)
        stats.extra.update(overlap_counts(removed))
        stats.check_balanced()
    return clean, removed


def overlap_counts(rejected: pl.DataFrame) -> dict[str, int]:
    """Rows removed for overlap, per benchmark, as metadata entries (benchmark_overlap/<benchmark>)."""
    if "benchmark" not in rejected.columns:
        return {}
    hits = rejected.filter(pl.col("reason") == OVERLAP_REASON).group_by("benchmark").len().sort("benchmark")
    return {f"{OVERLAP_REASON}/{b}": int(n) for b, n in hits.iter_rows()}
