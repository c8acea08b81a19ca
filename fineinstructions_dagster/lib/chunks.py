"""Per-shard stages in bounded memory, resumable inside a partition.

A stage reads its shard's input in chunks of about `chunk_rows` rows (never splitting a group, e.g. a document's
k matches, so their prompts stay together and share a prefix), processes each chunk, and writes its output as a
*part* named by a hash of what defines it: the stage's definition (config, model, revision, prompt version) and
the chunk's input ids. Parts live on the storage root (`_parts/<table>/<partition>/`), so a re-run, on this
machine or another sharing the root, skips every part that exists. When every chunk is done the parts are
streamed into the partition's file in one atomic publish and removed. Memory depends on `chunk_rows`, never on
the shard's size.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import polars as pl

from fineinstructions_dagster.lib.stats import StageStats
from fineinstructions_dagster.lib.storage import TableStore, file_lock

PARTS_DIR = "_parts"
LOOKAHEAD_ROWS = 256  # rows read past a chunk's end to find where its last group ends


@dataclass
class ChunkOutput:
    kept: pl.DataFrame
    quarantined: pl.DataFrame
    stats: StageStats
    # tables the same step writes beside its own, chunk by chunk (e.g. the judged control pairs): table -> rows
    side: dict[str, pl.DataFrame] = field(default_factory=dict)


@dataclass
class Progress:
    """What a running stage reports after each chunk (run log, progress bar)."""

    stage: str
    partition: str
    rows_done: int
    rows_total: int
    chunks_done: int
    chunks_resumed: int
    seconds: float
    completion_tokens: int = 0
    rows_processed: int = 0  # rows_done minus the resumed chunks' rows: what this run's time was spent on

    @property
    def rows_per_s(self) -> float:
        return self.rows_processed / self.seconds if self.seconds > 0 else 0.0

    @property
    def eta_s(self) -> float | None:
        rate = self.rows_per_s
        return (self.rows_total - self.rows_done) / rate if rate > 0 else None

    def line(self) -> str:
        eta = self.eta_s
        tok = f", {self.completion_tokens / self.seconds:.1f} output tok/s" if self.completion_tokens else ""
        return (f"{self.stage}[{self.partition}]: {self.rows_done}/{self.rows_total} rows "
                f"({self.chunks_done} chunks, {self.chunks_resumed} resumed), {self.rows_per_s:.1f} rows/s{tok}, "
                f"ETA {'-' if eta is None else f'{eta:.0f} s'}")


def progress_bar(p: Progress, stream: Any = None, width: int = 30) -> None:
    """One line, redrawn in place, for a terminal (the command-line runner)."""
    import sys

    stream = stream or sys.stderr
    share = p.rows_done / p.rows_total if p.rows_total else 1.0
    filled = int(width * min(share, 1.0))
    eta = p.eta_s
    stream.write(f"\r   {p.stage:<16} [{'#' * filled}{'.' * (width - filled)}] {p.rows_done}/{p.rows_total} "
                 f"{p.rows_per_s:6.1f} rows/s ETA {'-' if eta is None else f'{eta:5.0f}s'}")
    if p.rows_done >= p.rows_total:
        stream.write("\n")
    stream.flush()


@dataclass
class ChunkedRun:
    """The result of a chunked stage: summed statistics, throughput, and how much was resumed."""

    stats: StageStats
    rows: int = 0
    rows_processed: int = 0  # excluding resumed chunks
    chunks: int = 0
    chunks_resumed: int = 0
    seconds: float = 0.0


def definition_hash(*parts: Any) -> str:
    """A short hash of what defines a stage's output besides its input (config, model, revision, prompt)."""
    return hashlib.sha256(repr(parts).encode()).hexdigest()[:16]


def chunks_of(path: Path, chunk_rows: int, group: str | None, columns: list[str] | None = None
              ) -> Iterator[pl.DataFrame]:
    """The rows of one Parquet file in file order, about `chunk_rows` at a time, read slice by slice (never the
    whole file). With `group`, a chunk ends only where that column's value changes (the file must keep a
    group's rows together), unless one group alone is longer than the look-ahead; a tail under a quarter of
    `chunk_rows` that fits in the look-ahead is part of the chunk before it."""
    scan = pl.scan_parquet(path)
    if columns is not None:
        scan = scan.select(columns)
    offset = 0
    while True:
        frame = scan.slice(offset, chunk_rows + (LOOKAHEAD_ROWS if group else 0)).collect()
        if frame.height == 0:
            return
        cut = frame.height
        if group and frame.height > chunk_rows:
            values = frame[group]
            later = (values.slice(chunk_rows) != values[chunk_rows - 1]).arg_true()
            cut = chunk_rows + int(later[0]) if later.len() else frame.height
            # A short tail (the file ends within the look-ahead) joins this chunk rather than making a chunk of a
            # few documents: what is estimated over a chunk's documents (the hubness penalty, each instruction's
            # relevance baseline) needs more than a handful of them.
            if frame.height < chunk_rows + LOOKAHEAD_ROWS and frame.height - cut < max(1, chunk_rows // 4):
                cut = frame.height
        yield frame.head(cut)
        offset += cut


def rows_for(path: Path, key: str, ids: pl.Series, columns: list[str] | None = None) -> pl.DataFrame:
    """The rows of a Parquet file whose `key` is one of `ids`. The files of a shard are sorted by doc_id, so
    a chunk's ids span a narrow range and the range predicate lets the reader skip the other row groups."""
    ids = ids.drop_nulls().unique()
    scan = pl.scan_parquet(path)
    if ids.len() == 0:
        return (scan.select(columns) if columns else scan).head(0).collect()
    scan = scan.filter(pl.col(key).is_between(pl.lit(ids.min()), pl.lit(ids.max())) & pl.col(key).is_in(ids.implode()))
    return (scan.select(columns) if columns else scan).collect()


def count_rows(path: Path) -> int:
    return int(pl.scan_parquet(path).select(pl.len()).collect().item())


def run_chunked(
    store: TableStore, table: str, partition: str, chunks: Iterator[pl.DataFrame], id_column: str,
    definition: str, process: Callable[[pl.DataFrame], ChunkOutput], empty_kept: pl.DataFrame,
    empty_quarantined: pl.DataFrame, rows_total: int, report: Callable[[Progress], None] | None = None,
    side_tables: dict[str, pl.DataFrame] | None = None,
    finish: Callable[[pl.LazyFrame], pl.DataFrame] | None = None,
) -> ChunkedRun:
    """Process `chunks` (each a frame with `id_column`) into parts, skipping parts that exist, then publish the
    partition of `table` (and its quarantine) whole. `definition`: `definition_hash(...)` of the stage's
    config, model and prompt; with the chunk's ids it names the part, so a changed config never reuses a part.
    Two runs of one partition on one working copy take turns (a lock per partition), so the second never lists
    parts the first then publishes and removes. `side_tables` (table -> its empty frame): tables each chunk also
    writes (`ChunkOutput.side`), kept as parts beside the chunk's and published with the partition. `finish`:
    a rule over the whole partition (every kept part's rows) that returns rows to move to the quarantine (with
    `id_column` and a `reason`); it runs on the parts, so a resumed run moves the same rows."""
    side_tables = side_tables or {}
    with file_lock(store.root / PARTS_DIR / table / f".{partition}.lock"):
        folder = f"{PARTS_DIR}/{table}/{partition}"
        total = StageStats()
        kept_parts: list[Path] = []
        quarantined_parts: list[Path] = []
        side_parts: dict[str, list[Path]] = {t: [] for t in side_tables}
        run = ChunkedRun(total)
        started = time.monotonic()
        tokens = 0
        for chunk in chunks:
            ids = chunk[id_column].cast(pl.String)
            name = hashlib.sha256((definition + "\x1e" + "\x1f".join(ids.to_list())).encode()).hexdigest()[:24]
            done = store.read_json(f"{folder}/{name}.json")  # written last: a part is complete when it exists
            resumed = (done is not None and store.exists(folder, name) and store.exists(folder, f"{name}-q")
                       and all(store.exists(folder, f"{name}-s-{t}") for t in side_tables))
            if resumed:
                # Rows are accounted for; the work (engine requests, tokens, seconds) was another run's.
                stats = StageStats(total=done["total"], kept=done["kept"])
                stats.dropped.update(done["dropped"])
                run.chunks_resumed += 1
            else:
                out = process(chunk)
                stats = out.stats
                store.write(folder, out.kept, name)
                store.write(folder, out.quarantined, f"{name}-q")
                if set(out.side) != set(side_tables):
                    raise ValueError(f"{table}: a chunk wrote side tables {sorted(out.side)}, the step declares "
                                     f"{sorted(side_tables)}")
                for t, rows in out.side.items():
                    store.write(folder, rows, f"{name}-s-{t}")
                store.write_json(f"{folder}/{name}.json", {"total": stats.total, "kept": stats.kept,
                                                           "dropped": dict(stats.dropped), "extra": stats.extra})
            kept_parts.append(store.path(folder, name))
            quarantined_parts.append(store.path(folder, f"{name}-q"))
            for t in side_tables:
                side_parts[t].append(store.path(folder, f"{name}-s-{t}"))
            total.merge(stats)
            run.rows += chunk.height
            run.rows_processed += 0 if resumed else chunk.height
            run.chunks += 1
            tokens += int(stats.extra.get("completion_tokens", 0))
            if report is not None:
                report(Progress(table, partition, run.rows, rows_total, run.chunks, run.chunks_resumed,
                                time.monotonic() - started, tokens, run.rows_processed))
        moved = finish(pl.scan_parquet(kept_parts)) if finish is not None and kept_parts else None
        without = with_moved = None
        if moved is not None and moved.height:
            total.kept -= moved.height
            total.drop_counts(moved["reason"])

            def without(rows: pl.LazyFrame) -> pl.LazyFrame:
                return rows.join(moved.lazy().select(id_column), on=id_column, how="anti", maintain_order="left")

            def with_moved(rows: pl.LazyFrame) -> pl.LazyFrame:
                names = rows.collect_schema().names()
                extra = moved.lazy().select([c for c in moved.columns if c in names])
                return pl.concat([rows, extra], how="diagonal_relaxed").select(names)
        store.write_parts(table, kept_parts, empty_kept, partition, transform=without)
        store.write_parts(table, quarantined_parts, empty_quarantined, partition, quarantine=True,
                          transform=with_moved)
        for t, empty in side_tables.items():
            store.write_parts(t, side_parts[t], empty, partition)
        store.remove_dir(folder)
        run.seconds = time.monotonic() - started
        total.check_balanced()
        return run
