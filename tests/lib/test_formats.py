import gzip
import json

import polars as pl
import pytest

from fineinstructions_dagster.lib.formats import (
    InputFormatError,
    discover_sources,
    malformed_frame,
    partition_key_for,
    read_texts,
)


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
    assert sorted(discover_sources(tmp_path, subfolders_are_sources=False)) == ["My-Source"]
    assert partition_key_for("CC-MAIN 2024/10.jsonl.gz") == "CC-MAIN-2024-10"


def test_streaming_batches_keep_row_numbers_and_read_zstd(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

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
    assert report.malformed_lines == [("z.jsonl.zst", 2, "invalid JSON: Expecting value")]
