"""Inputs that used to crash a shard or change data silently: the same row twice in a file, bytes that are not
UTF-8, text fields that are not strings, files discovery cannot read, and two files with one stem."""

from __future__ import annotations

import json
from pathlib import Path

import polars as pl
import pytest

from fineinstructions_dagster.config import DocumentFilterConfig, QueryFilterConfig
from fineinstructions_dagster.defs.inputs import corpus_shards, query_sources, read_partition_input, skipped_inputs
from fineinstructions_dagster.stages.dedup import MinhashConfig, dedup_in_one_process
from fineinstructions_dagster.stages.documents import apply_duplicate_decisions, prepare_shard
from fineinstructions_dagster.stages.queries import clean_queries

DOCS = DocumentFilterConfig(min_words=5, languages=None)
A = ("The quick brown fox jumps over the lazy dog near the quiet river bank, and that is the end of it.\n"
     "Then it went home to rest with the other foxes of the forest.")
B = ("A small grey cat sat by the warm kitchen window and watched the rain fall on the garden all afternoon.\n"
     "When the rain stopped it went out to look for the birds in the old apple tree.")


def write(path: Path, rows: list[dict[str, str]]) -> str:
    if path.suffix == ".parquet":
        pl.DataFrame(rows).write_parquet(path)
    else:
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def run_documents(shards: dict[str, list[str]], tmp_path: Path) -> dict[str, tuple]:
    """filtered_documents -> document_clusters -> documents, through the stage functions."""
    prepared = {}
    for shard, files in shards.items():
        scratch = tmp_path / "scratch" / shard
        scratch.mkdir(parents=True)
        prepared[shard] = prepare_shard(files, shard, DOCS, MinhashConfig(), scratch, batch_rows=2)
    decisions = dedup_in_one_process({s: (p.signatures, p.bands) for s, p in prepared.items()}, tmp_path / "dedup",
                                     MinhashConfig())
    return {shard: (p, *apply_duplicate_decisions(pl.read_parquet(p.kept), decisions.filter(pl.col("shard") == shard)))
            for shard, p in prepared.items()}


@pytest.mark.parametrize("name,with_id", [("s.jsonl", True), ("s.jsonl", False), ("s.parquet", True),
                                          ("s.parquet", False)])
def test_same_row_twice_in_a_file_is_an_exact_duplicate_not_a_crash(tmp_path, name, with_id):
    rows = [{"text": A, "url": "http://x/a"}, {"text": B, "url": "http://x/b"}, {"text": A, "url": "http://x/a"}]
    if with_id:
        rows = [{"id": "a" if r["text"] == A else "b", **r} for r in rows]
    files = {"s": [write(tmp_path / name, rows)]}
    prepared, kept, removed, stats = run_documents(files, tmp_path)["s"]
    assert prepared.stats.total == prepared.stats.kept == 3
    assert pl.read_parquet(prepared.kept)["doc_id"].is_unique().all()
    assert (stats.total, stats.kept, dict(stats.dropped)) == (3, 2, {"exact_duplicate": 1})
    assert stats.total == stats.kept + stats.dropped_total
    assert sorted(kept["text"].to_list()) == sorted([A, B]) and kept["doc_id"].is_unique().all()
    dup = removed.row(0, named=True)
    assert dup["reason"] == "exact_duplicate" and dup["duplicate_of"] in kept["doc_id"].to_list()
    assert dup["source_row"] in (1, 3)
    assert prepared.stats.extra["rows_with_repeated_source_id"] == (2 if with_id else 0)
    # re-running reproduces the same ids
    again = run_documents(files, tmp_path / "again")["s"]
    assert sorted(again[1]["doc_id"]) == sorted(kept["doc_id"])


def test_duplicates_across_shards_are_decided_per_shard(tmp_path):
    shards = {"one": [write(tmp_path / "one.jsonl", [{"text": A}, {"text": A}])],
              "two": [write(tmp_path / "two.parquet", [{"text": A}, {"text": B}])]}
    out = run_documents(shards, tmp_path)
    assert sum(kept.height for _, kept, _, _ in out.values()) == 2
    for prepared, kept, removed, stats in out.values():
        assert stats.total == kept.height + removed.height == prepared.stats.kept == 2
        assert set(removed["reason"]) <= {"exact_duplicate"}


def test_a_repeated_source_id_with_different_texts_keeps_both(tmp_path):
    files = {"s": [write(tmp_path / "s.jsonl", [{"id": "1", "text": A}, {"id": "1", "text": B}])]}
    prepared, kept, _, stats = run_documents(files, tmp_path)["s"]
    assert kept.height == 2 and kept["doc_id"].is_unique().all()
    assert prepared.stats.extra["rows_with_repeated_source_id"] == 2


def test_bad_lines_are_quarantined_with_reason_and_counted(tmp_path):
    f = tmp_path / "bad.jsonl"
    f.write_bytes(json.dumps({"text": A}).encode() + b'\n{"text": "caf\xe9 au lait"}\n{"text": 42}\n{"text": [1]}\n'
                  + b'{"text": false}\nnot json\n' + json.dumps({"text": B}).encode() + b"\n")
    prepared = prepare_shard([str(f)], "bad", DOCS, MinhashConfig(), tmp_path)
    assert prepared.stats.total == 7 and prepared.stats.kept == 2
    assert dict(prepared.stats.dropped) == {"invalid_utf8": 1, "text_not_string": 3, "malformed_json": 1}
    assert prepared.malformed.select("source_file", "source_row", "reason").rows() == [
        ("bad.jsonl", 2, "invalid_utf8"), ("bad.jsonl", 3, "text_not_string"), ("bad.jsonl", 4, "text_not_string"),
        ("bad.jsonl", 5, "text_not_string"), ("bad.jsonl", 6, "malformed_json")]
    assert "\ufffd" not in "".join(pl.read_parquet(prepared.kept)["text"])


@pytest.mark.parametrize("with_id", [True, False])
def test_same_query_twice_in_a_file_is_deduplicated_with_a_reason(tmp_path, with_id):
    q = "How do I reverse a list in Python?"
    rows = [{"query": q}, {"query": "What does the walrus operator do?"}, {"query": q}, {"query": 7}]
    rows = [{"id": "q1", **r} for r in rows] if with_id else rows
    write(tmp_path / "src.jsonl", rows)
    raw, quarantined = read_partition_input(query_sources(str(tmp_path)), "src", str(tmp_path), "query source")
    kept, rejected, stats = clean_queries(raw, "src", QueryFilterConfig(min_words=3))
    for reason, n in quarantined.group_by("reason").len().rows():  # what the user_queries asset does
        stats.count_unread(reason, n)
    assert kept["query_id"].is_unique().all() and kept.height == 2
    assert rejected.select("source_row", "reason").rows() == [(3, "duplicate")]
    assert dict(stats.dropped) == {"duplicate": 1, "text_not_string": 1}
    assert stats.total == stats.kept + stats.dropped_total == 4


def test_discovery_lists_what_it_skips_and_keeps_one_partition_per_file(tmp_path):
    for name in ("x.jsonl", "x.parquet"):
        write(tmp_path / name, [{"text": A}])
    (tmp_path / "dump1").mkdir()
    write(tmp_path / "dump1" / "file.parquet", [{"text": B}])
    for name in ("table.csv", "old.jsonl.bz2", "_SUCCESS", ".hidden.jsonl"):
        (tmp_path / name).write_text("text\n")
    shards = corpus_shards(str(tmp_path))
    assert shards == {"dump1__file": [str(tmp_path / "dump1" / "file.parquet")],
                      "x.jsonl": [str(tmp_path / "x.jsonl")], "x.parquet": [str(tmp_path / "x.parquet")]}
    assert sorted(Path(s.path).name for s in skipped_inputs(str(tmp_path))) == ["old.jsonl.bz2", "table.csv"]
