"""Corpus shards under an s3:// prefix, listed and fetched with the platform's S3 client (boto3, as the tables),
against a local moto server."""

from __future__ import annotations

import gzip
import io
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from fineinstructions_dagster.config import DocumentFilterConfig
from fineinstructions_dagster.lib.formats import discover_sources, iter_text_batches
from fineinstructions_dagster.stages.dedup import MinhashConfig
from fineinstructions_dagster.stages.documents import prepare_shard

TEXT = ("The quick brown fox jumps over the lazy dog near the quiet river bank, and that is the end of it. "
        "Then it went home to rest with the other foxes of the forest and the dog went to the farm.")


@pytest.fixture
def s3(moto_s3):
    moto_s3.create_bucket(Bucket="corpus")
    return moto_s3


def test_shards_under_an_s3_prefix_are_discovered_and_streamed(s3, tmp_path):
    lines = [json.dumps({"id": f"j{i}", "text": f"{TEXT} Variant {i}.", "url": f"https://x/{i}"}) for i in range(3)]
    s3.put_object(Bucket="corpus", Key="cc/shard-1.jsonl.gz", Body=gzip.compress(("\n".join(lines) + "\n").encode()))
    buf = io.BytesIO()
    pq.write_table(pa.table({"text": [TEXT], "id": ["p0"]}), buf)
    s3.put_object(Bucket="corpus", Key="cc/shard-2.parquet", Body=buf.getvalue())
    found = discover_sources("s3://corpus/cc", subfolders_are_sources=False)
    assert found == {"shard-1": ["s3://corpus/cc/shard-1.jsonl.gz"], "shard-2": ["s3://corpus/cc/shard-2.parquet"]}
    batches = list(iter_text_batches(found["shard-1"], batch_rows=2))
    assert [b.height for b in batches] == [2, 1]
    out = prepare_shard(found["shard-2"], "shard-2", DocumentFilterConfig(min_words=10), MinhashConfig(), tmp_path)
    assert out.stats.kept == 1 and len(out.signatures) == 1


def test_missing_s3_prefix_is_a_clear_error(s3):
    with pytest.raises(FileNotFoundError, match="s3://corpus/nothing-here does not exist"):
        discover_sources("s3://corpus/nothing-here", subfolders_are_sources=False)


def test_an_s3_input_is_fetched_once_per_version_of_the_object(s3, tmp_path, monkeypatch):
    from fineinstructions_dagster.lib.storage import local_copy

    monkeypatch.setenv("FINEINSTRUCTIONS_CACHE_DIR", str(tmp_path / "cache"))
    s3.put_object(Bucket="corpus", Key="cc/a.jsonl", Body=json.dumps({"text": "first"}).encode() + b"\n")
    first = local_copy("s3://corpus/cc/a.jsonl")
    assert first.read_text().strip() == '{"text": "first"}'
    mtime = first.stat().st_mtime_ns
    assert local_copy("s3://corpus/cc/a.jsonl").stat().st_mtime_ns == mtime  # unchanged object: not fetched again
    s3.put_object(Bucket="corpus", Key="cc/a.jsonl", Body=json.dumps({"text": "second"}).encode() + b"\n")
    assert local_copy("s3://corpus/cc/a.jsonl").read_text().strip() == '{"text": "second"}'
    with pytest.raises(FileNotFoundError, match="s3://corpus/cc/gone.jsonl: no such object"):
        local_copy("s3://corpus/cc/gone.jsonl")


def test_no_code_uses_a_second_s3_stack():
    """Inputs, tables and the index share one client (lib/storage.make_s3_client): nothing opens pyarrow's or
    fsspec's S3 filesystems."""
    from pathlib import Path

    package = Path(__file__).resolve().parents[2] / "fineinstructions_dagster"
    second = ("S3FileSystem", "FileSystem.from_uri", "import s3fs", "construct_s3_client")
    offenders = [str(f) for f in package.rglob("*.py") if any(s in f.read_text() for s in second)]
    assert offenders == []
