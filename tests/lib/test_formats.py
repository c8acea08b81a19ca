import gzip
import json
from pathlib import Path

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from fineinstructions_dagster.defs.inputs import skipped_inputs, skipped_metadata
from fineinstructions_dagster.lib.formats import (
    InputFormatError,
    _assign_keys,
    discover_sources,
    malformed_frame,
    partition_key_for,
    read_texts,
    scan_inputs,
)
from fineinstructions_dagster.lib.storage import check_partition_key


def test_jsonl_broken_lines_are_reported_not_fatal(tmp_path):
    f = tmp_path / "shard.jsonl"
    f.write_text('{"text": "good one", "id": "1"}\n{"text": broken\n[1, 2]\n\n{"text": "good two", "id": "2"}\n')
    df, report = read_texts([f])
    assert df["text"].to_list() == ["good one", "good two"]
    bad = malformed_frame(report)
    assert bad["source_row"].to_list() == [2, 3]
    assert set(bad["reason"]) == {"malformed_json"} and bad["source_file"][0] == "shard.jsonl"


def test_fineweb_style_parquet_and_gzipped_jsonl_normalise_the_same(tmp_path):
    rows = [{"text": "hello world", "id": "a", "url": "http://x", "dump": "CC-1", "token_count": 2}]
    pl.DataFrame(rows).write_parquet(tmp_path / "a.parquet")
    with gzip.open(tmp_path / "b.jsonl.gz", "wt") as fh:
        fh.write(json.dumps(rows[0]) + "\n")
    a, _ = read_texts([tmp_path / "a.parquet"])
    b, _ = read_texts([tmp_path / "b.jsonl.gz"])
    cols = ["source_id", "text", "url"]
    assert a.select(cols).to_dicts() == b.select(cols).to_dicts() == [{"source_id": "a", "text": "hello world",
                                                                        "url": "http://x"}]
    assert json.loads(a["metadata"][0]) == {"dump": "CC-1", "token_count": 2}


def test_corrupt_parquet_names_the_file(tmp_path):
    f = tmp_path / "bad.parquet"
    f.write_bytes(b"PAR1 this is not parquet")
    with pytest.raises(InputFormatError, match="bad.parquet: not a readable Parquet file"):
        read_texts([f])


def test_missing_text_column_names_file_and_columns(tmp_path):
    f = tmp_path / "x.parquet"
    pl.DataFrame({"body": ["a"]}).write_parquet(f)
    with pytest.raises(InputFormatError, match=r"x.parquet: no text column.*found body"):
        read_texts([f])


def test_discovery_maps_files_and_subfolders_to_safe_keys(tmp_path):
    (tmp_path / "My Source.jsonl").write_text("")
    (tmp_path / "reddit").mkdir()
    (tmp_path / "reddit" / "part-0.parquet").write_text("")
    (tmp_path / "notes.txt").write_text("")
    assert sorted(discover_sources(tmp_path, subfolders_are_sources=True)) == ["My-Source", "reddit"]
    # corpus shards: files in subfolders are shards too, keyed by their relative path
    assert sorted(discover_sources(tmp_path, subfolders_are_sources=False)) == ["My-Source", "reddit__part-0"]
    assert partition_key_for("CC-MAIN 2024/10.jsonl.gz") == "CC-MAIN-2024-10"
    assert partition_key_for("weird..name.jsonl") == "weird.name" and partition_key_for("_x-.parquet") == "x"


def test_discovery_one_partition_per_file_nested_and_skipped_files_listed(tmp_path):
    files = ["tutorial.parquet", "howto.parquet", "faq.jsonl", "x.jsonl", "x.parquet", "notes.csv", "y.jsonl.bz2",
             "readme.txt", "_SUCCESS", ".DS_Store", "_delta_log/0.json", "data/CC-MAIN-2024-10/000_00000.parquet",
             "data/CC-MAIN-2024-10/000_00001.jsonl.gz", "a b.jsonl", "a-b.jsonl", "q/sub/p.jsonl", "q/r.jsonl"]
    for f in files:
        (tmp_path / f).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / f).write_text("")
    found = scan_inputs(str(tmp_path), subfolders_are_sources=False)
    for key in found.sources:
        check_partition_key(key)
    assert all(len(v) == 1 for v in found.sources.values())
    keys = set(found.sources)
    assert {"tutorial", "howto", "faq", "x.jsonl", "x.parquet", "data__CC-MAIN-2024-10__000_00000",
            "data__CC-MAIN-2024-10__000_00001", "q__r", "q__sub__p"} <= keys
    assert len(keys) == len(files) - 6  # every readable file, names made alike ("a b", "a-b") told apart
    assert [(Path(s.path).name, s.reason.split(";")[0]) for s in found.skipped] == [
        ("notes.csv", "unsupported file type (.csv)"), ("readme.txt", "unsupported file type (.txt)"),
        ("y.jsonl.bz2", "unsupported file type (.jsonl.bz2)")]
    assert skipped_inputs(str(tmp_path)) == found.skipped
    meta = skipped_metadata(found.skipped, limit=2)
    assert meta["skipped_input_files"] == 3 and meta["skipped_inputs"].endswith("... and 1 more")
    # query sources: a subfolder is one source
    queries = scan_inputs(str(tmp_path), subfolders_are_sources=True).sources
    assert sorted(Path(p).name for p in queries["q"]) == ["p.jsonl", "r.jsonl"]
    assert "data" in queries and "x.jsonl" in queries and "x.parquet" in queries


def test_long_nested_keys_stay_valid_and_distinct():
    deep = [("d" * 120, "e" * 120, f"{i}.parquet") for i in range(2)]
    keys = _assign_keys(deep, [False, False])
    assert len(set(keys)) == 2 and all(len(k) <= 200 and check_partition_key(k) for k in keys)


def test_same_name_in_two_subfolders_of_a_source_keeps_files_apart(tmp_path):
    for sub in ("a", "b"):
        (tmp_path / "src" / sub).mkdir(parents=True)
        (tmp_path / "src" / sub / "part-0.jsonl").write_text('{"text": "same words here"}\n')
    df, _ = read_texts(discover_sources(str(tmp_path), subfolders_are_sources=True)["src"])
    assert df["source_file"].to_list() == ["a/part-0.jsonl", "b/part-0.jsonl"]


def test_jsonl_lines_that_would_change_are_quarantined_by_line(tmp_path):
    f = tmp_path / "s.jsonl"
    f.write_bytes(b'\xef\xbb\xbf{"text": "kept one", "id": 5, "score": 1.5, "flag": true, "tags": [1]}\n'
                  b'{"text": "caf\xe9 latin-1"}\n{"text": 12}\n{"text": true}\n{"text": null}\n{"text": ["a"]}\n'
                  b'{"text": {"a": 1}}\n{"content": "other field"}\n{"text": "lone \\ud800 escape"}\n'
                  b'{"text": "emoji \\ud83d\\ude00 pair", "tags": "s"}\r\n')
    df, report = read_texts([f])
    assert df.select("source_row", "source_id", "text").rows() == [(1, "5", "kept one"),
                                                                   (10, None, "emoji \U0001f600 pair")]
    assert "\ufffd" not in "".join(df["text"])
    assert json.loads(df["metadata"][0]) == {"score": 1.5, "flag": True, "tags": [1]}  # types kept as written
    bad = malformed_frame(report)
    assert bad.select("source_row", "reason").rows() == [
        (2, "invalid_utf8"), (3, "text_not_string"), (4, "text_not_string"), (5, "text_not_string"),
        (6, "text_not_string"), (7, "text_not_string"), (8, "no_text_field"), (9, "invalid_utf8")]
    assert bad["detail"][1] == "field 'text' is a JSON number, not a string" and "0xe9" in bad["detail"][0]
    assert set(bad["source_file"]) == {"s.jsonl"}


def test_jsonl_without_a_text_field_names_file_and_fields(tmp_path):
    f = tmp_path / "n.jsonl"
    f.write_text('{"body": "x", "id": 1}\n')
    with pytest.raises(InputFormatError, match=r"n.jsonl: no text field on line 1.*found body, id"):
        read_texts([f])


def test_parquet_text_column_must_be_strings_and_valid_utf8(tmp_path):
    pq.write_table(pa.table({"text": [1, 2]}), tmp_path / "i.parquet")
    with pytest.raises(InputFormatError, match=r"i.parquet: text column 'text' has type int64"):
        read_texts([tmp_path / "i.parquet"])
    bad = pa.array([b"fine", b"\xffbad"], pa.binary()).view(pa.string())  # written without validation
    pq.write_table(pa.table({"id": ["a", "b"], "text": bad}), tmp_path / "u.parquet")
    with pytest.raises(InputFormatError, match=r"u.parquet: column 'text' holds invalid UTF-8"):
        read_texts([tmp_path / "u.parquet"])
    pq.write_table(pa.table({"text": pa.array(["a", "b"]).dictionary_encode()}), tmp_path / "d.parquet")
    assert read_texts([tmp_path / "d.parquet"])[0]["text"].to_list() == ["a", "b"]


def test_streaming_batches_keep_row_numbers_and_read_zstd(tmp_path):
    from fineinstructions_dagster.lib.formats import ReadReport, iter_text_batches

    pq.write_table(pa.table({"text": [f"doc {i}" for i in range(5)]}), tmp_path / "s.parquet", row_group_size=2)
    batches = list(iter_text_batches([str(tmp_path / "s.parquet")], batch_rows=2))
    assert [b.height for b in batches] == [2, 2, 1]
    assert pl.concat(batches)["source_row"].to_list() == [1, 2, 3, 4, 5]
    import pyarrow.fs as pafs

    with pafs.LocalFileSystem().open_output_stream(str(tmp_path / "z.jsonl.zst"), compression="zstd") as out:
        out.write(b'{"content": "zstd line one"}\nnot json\n{"content": "zstd line three"}\n')
    report = ReadReport()
    rows = pl.concat(list(iter_text_batches([str(tmp_path / "z.jsonl.zst")], batch_rows=1, report=report)))
    assert rows["text"].to_list() == ["zstd line one", "zstd line three"] and rows["source_row"].to_list() == [1, 3]
    assert report.quarantined == [("z.jsonl.zst", 2, "malformed_json", "invalid JSON: Expecting value")]
