"""Chunked, resumable per-shard processing: groups never split, parts reused on a re-run, the partition
identical to an uninterrupted run, a changed definition never reusing a part."""

from __future__ import annotations

import polars as pl
import pytest

from fineinstructions_dagster.lib.chunks import ChunkOutput, Progress, chunks_of, definition_hash, rows_for, run_chunked
from fineinstructions_dagster.lib.stats import StageStats
from fineinstructions_dagster.lib.storage import TableStore


@pytest.fixture
def matches(tmp_path):
    """1,000 documents with 1 to 5 matches each, sorted by doc_id, in small row groups."""
    rows = [{"match_id": f"m{d:04d}-{j}", "doc_id": f"d{d:04d}", "n": d * 10 + j}
            for d in range(1000) for j in range(1 + d % 5)]
    path = tmp_path / "matches.parquet"
    pl.DataFrame(rows).write_parquet(path, row_group_size=256)
    return path


def test_chunks_never_split_a_document_and_cover_every_row_once(matches):
    chunks = list(chunks_of(matches, 100, "doc_id"))
    assert sum(c.height for c in chunks) == pl.read_parquet(matches).height
    seen: set[str] = set()
    for c in chunks:
        docs = set(c["doc_id"])
        assert not docs & seen  # a document's rows are all in one chunk
        seen |= docs
        assert 100 <= c.height <= 104 or c is chunks[-1]
    assert pl.concat(chunks).equals(pl.read_parquet(matches))


def test_a_short_tail_joins_the_chunk_before_it(tmp_path):
    # no chunk of a handful of documents at the end (its estimates over the chunk's documents would be noise)
    path = tmp_path / "m.parquet"
    pl.DataFrame({"doc_id": [f"d{i:03d}" for i in range(105)]}).write_parquet(path)
    assert [c.height for c in chunks_of(path, 100, "doc_id")] == [105]
    assert [c.height for c in chunks_of(path, 60, "doc_id")] == [60, 45]  # a tail of 45 is a chunk of its own


def test_rows_for_reads_only_the_ids_asked(matches):
    got = rows_for(matches, "doc_id", pl.Series(["d0007", "d0003", "d0003"]), ["doc_id", "n"])
    assert sorted(got["doc_id"].unique()) == ["d0003", "d0007"] and got.height == 4 + 3
    assert rows_for(matches, "doc_id", pl.Series([], dtype=pl.String), ["doc_id"]).height == 0


def double(chunk: pl.DataFrame, calls: list[int], fail_at: int | None = None) -> ChunkOutput:
    calls.append(chunk.height)
    if fail_at is not None and len(calls) == fail_at:
        raise RuntimeError("killed")
    kept = chunk.filter(pl.col("n") % 3 != 0).with_columns((pl.col("n") * 2).alias("n2"))
    dropped = chunk.filter(pl.col("n") % 3 == 0).with_columns(pl.lit("multiple_of_three").alias("reason"))
    stats = StageStats(total=chunk.height, kept=kept.height)
    stats.drop("multiple_of_three", dropped.height)
    stats.extra["completion_tokens"] = chunk.height
    return ChunkOutput(kept, dropped, stats)


def run(store, matches, calls, definition="v1", fail_at=None, progress=None):
    empty = pl.read_parquet(matches, n_rows=0)
    return run_chunked(store, "doubled", "s1", chunks_of(matches, 100, "doc_id"), "match_id", definition,
                       lambda c: double(c, calls, fail_at), empty.with_columns(pl.lit(0).alias("n2")),
                       empty.with_columns(pl.lit("").alias("reason")), 3000, progress)


def test_a_killed_run_resumes_with_the_finished_chunks_and_the_same_result(tmp_path, matches):
    reference = TableStore(tmp_path / "ref")
    full_calls: list[int] = []
    full = run(reference, matches, full_calls)
    store = TableStore(tmp_path / "root")
    with pytest.raises(RuntimeError, match="killed"):
        run(store, matches, [], fail_at=15)  # dies in its 15th chunk: 14 parts are on the root
    assert not store.exists("doubled", "s1")  # nothing published
    resumed_calls: list[int] = []
    reports: list[Progress] = []
    resumed = run(store, matches, resumed_calls, progress=reports.append)
    assert resumed.chunks_resumed == 14 and len(resumed_calls) == len(full_calls) - 14
    assert store.read("doubled", "s1").equals(reference.read("doubled", "s1"))
    assert store.read("doubled", "s1", quarantine=True).equals(reference.read("doubled", "s1", quarantine=True))
    rows_of = {k: v for k, v in full.stats.as_dict().items() if k != "completion_tokens"}
    assert {k: v for k, v in resumed.stats.as_dict().items() if k != "completion_tokens"} == rows_of
    # the work counted is this run's only: the resumed chunks' tokens were paid by the killed run
    assert resumed.stats.extra["completion_tokens"] == sum(resumed_calls)
    assert reports[-1].rows_done == reports[-1].rows_total == pl.read_parquet(matches).height
    assert "rows/s" in reports[-1].line()
    assert not (tmp_path / "root" / "_parts" / "doubled" / "s1").exists()  # parts removed once published


def test_a_changed_definition_reuses_no_part(tmp_path, matches):
    store = TableStore(tmp_path / "root")
    with pytest.raises(RuntimeError):
        run(store, matches, [], fail_at=5)
    calls: list[int] = []
    again = run(store, matches, calls, definition=definition_hash("v2", 0.5))
    assert again.chunks_resumed == 0 and len(calls) == again.chunks


def test_two_runs_of_one_partition_take_turns(tmp_path, matches):
    import threading
    import time

    store = TableStore(tmp_path / "root")
    results, errors = [], []

    def slow(chunk: pl.DataFrame, calls: list[int], pause: float) -> ChunkOutput:
        time.sleep(pause)
        return double(chunk, calls)

    def one(pause: float, delay: float) -> None:
        time.sleep(delay)  # the second run starts while the first is half-way, and works more slowly
        try:
            empty = pl.read_parquet(matches, n_rows=0)
            results.append(run_chunked(store, "doubled", "s1", chunks_of(matches, 100, "doc_id"), "match_id", "v1",
                                       lambda c: slow(c, [], pause), empty.with_columns(pl.lit(0).alias("n2")),
                                       empty.with_columns(pl.lit("").alias("reason")), 3000))
        except Exception as e:  # the failure this guards against: parts removed under the second run
            errors.append(e)

    threads = [threading.Thread(target=one, args=(0.01, 0.0)), threading.Thread(target=one, args=(0.05, 0.1))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(results) == 2
    reference = TableStore(tmp_path / "ref")
    run(reference, matches, [])
    assert store.read("doubled", "s1").equals(reference.read("doubled", "s1"))


def test_a_rule_over_the_whole_partition_moves_rows_to_the_quarantine_before_the_publish(tmp_path, matches):
    """`finish` sees every part's rows (a rule no chunk can apply alone) and the rows it returns are published
    in the quarantine, not the table; a killed run's resume moves the same rows."""
    def largest_per_remainder(rows: pl.LazyFrame) -> pl.DataFrame:  # all but the 10 largest n of each n % 7
        ranked = rows.with_columns(pl.col("n").rank("ordinal", descending=True).over(pl.col("n") % 7).alias("r"))
        return ranked.filter(pl.col("r") > 10).select("match_id", "doc_id", "n", pl.lit("over_cap")
                                                      .alias("reason")).collect()

    def go(store: TableStore, fail_at: int | None = None):
        empty, calls = pl.read_parquet(matches, n_rows=0), []
        return run_chunked(store, "doubled", "s1", chunks_of(matches, 100, "doc_id"), "match_id", "v1",
                           lambda c: double(c, calls, fail_at), empty.with_columns(pl.lit(0).alias("n2")),
                           empty.with_columns(pl.lit("").alias("reason")), 3000, finish=largest_per_remainder)

    store = TableStore(tmp_path / "root")
    with pytest.raises(RuntimeError, match="killed"):
        go(store, fail_at=5)
    done = go(store)
    kept, quarantined = store.read("doubled", "s1"), store.read("doubled", "s1", quarantine=True)
    assert kept.group_by(pl.col("n") % 7).len()["len"].max() == 10 and kept.height == 70  # 10 of each remainder
    assert kept["match_id"].is_sorted() and set(kept.columns) == {"match_id", "doc_id", "n", "n2"}
    moved = quarantined.filter(pl.col("reason") == "over_cap")
    total = pl.read_parquet(matches).height
    assert moved.height + kept.height + quarantined.filter(pl.col("reason") == "multiple_of_three").height == total
    assert done.stats.kept == 70 and done.stats.dropped["over_cap"] == moved.height and done.stats.total == total
    reference = TableStore(tmp_path / "ref")
    go(reference)
    assert reference.read("doubled", "s1").equals(kept)
