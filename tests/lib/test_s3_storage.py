"""An s3:// storage root against a local moto S3 server: writes are published whole, other machines' working
copies see them, replaced and deleted partitions follow, a failed write publishes nothing."""

from __future__ import annotations

import polars as pl
import pytest

from fineinstructions_dagster.lib.storage import TableStore, default_working_copy, split_s3_uri


@pytest.fixture
def s3(moto_s3):
    moto_s3.create_bucket(Bucket="lake")
    return moto_s3


def keys(client, prefix: str = "") -> list[str]:
    return sorted(o["Key"] for o in client.list_objects_v2(Bucket="lake", Prefix=prefix).get("Contents", []))


def test_s3_uri_parsing_and_default_working_copy(monkeypatch, tmp_path):
    assert split_s3_uri("s3://bucket/a/b/") == ("bucket", "a/b")
    assert split_s3_uri("s3://bucket") == ("bucket", "")
    with pytest.raises(ValueError, match="must name a bucket"):
        split_s3_uri("s3:///x")
    monkeypatch.setenv("FINEINSTRUCTIONS_CACHE_DIR", str(tmp_path))
    assert default_working_copy("s3://bucket/a/b") == tmp_path / "s3" / "bucket" / "a/b"


def test_writes_are_published_and_seen_from_another_working_copy(s3, tmp_path):
    a = TableStore("s3://lake/run1", working_copy=tmp_path / "a")
    b = TableStore("s3://lake/run1", working_copy=tmp_path / "b")
    df = pl.DataFrame({"pair_id": ["p1", "p2"], "x": [1, 2]})
    a.write("fineinstructions", df, "shard-1")
    a.write("fineinstructions", df.head(1), "shard-1", quarantine=True)
    a.write_json("dataset_report/report.json", {"pairs": 2})
    assert keys(s3) == ["run1/dataset_report/report.json", "run1/fineinstructions/shard-1.parquet",
                        "run1/quarantine/fineinstructions/shard-1.parquet"]
    assert b.read("fineinstructions", "shard-1").equals(df)
    assert b.partitions("fineinstructions") == ["shard-1"]
    assert b.partitions("fineinstructions", quarantine=True) == ["shard-1"]
    assert pl.read_parquet(b.glob("fineinstructions")).height == 2
    assert (b.dir("dataset_report") / "report.json").read_text().count('"pairs": 2') == 1
    assert b.remote_tables() == ["dataset_report", "fineinstructions"]
    assert b.uri_of(b.path("fineinstructions", "shard-1")) == "s3://lake/run1/fineinstructions/shard-1.parquet"


def test_replaced_and_deleted_partitions_follow_the_bucket(s3, tmp_path):
    a = TableStore("s3://lake/p", working_copy=tmp_path / "a")
    b = TableStore("s3://lake/p", working_copy=tmp_path / "b")
    a.write("documents", pl.DataFrame({"doc_id": ["d1"]}), "s1")
    a.write("documents", pl.DataFrame({"doc_id": ["d2"]}), "s2")
    assert b.partitions("documents") == ["s1", "s2"]
    a.write("documents", pl.DataFrame({"doc_id": ["d3", "d4"]}), "s1")  # a re-run replaces the partition
    assert b.read("documents", "s1")["doc_id"].to_list() == ["d3", "d4"]
    s3.delete_object(Bucket="lake", Key="p/documents/s2.parquet")
    assert b.partitions("documents") == ["s1"]
    assert not b.path("documents", "s2").exists()
    assert not b.exists("documents", "s2")
    with pytest.raises(FileNotFoundError, match="s3://lake/p/documents/s2.parquet"):
        b.read("documents", "s2")


def test_a_failed_write_publishes_nothing(s3, tmp_path):
    store = TableStore("s3://lake/p", working_copy=tmp_path / "a")
    bad = pl.DataFrame({"x": [object()]}, schema={"x": pl.Object})
    with pytest.raises(Exception):  # noqa: B017 - Parquet cannot hold Python objects
        store.write("documents", bad, "s1")
    assert keys(s3) == []
    assert list(store.root.joinpath("documents").glob("*.parquet")) == []


def test_a_staged_folder_replaces_its_objects_whole(s3, tmp_path):
    a = TableStore("s3://lake/p", working_copy=tmp_path / "a")
    with a.staged_dir("template_index") as tmp:
        (tmp / "index.usearch").write_bytes(b"v1")
        (tmp / "old.parquet").write_bytes(b"x")
    with a.staged_dir("template_index") as tmp:
        (tmp / "index.usearch").write_bytes(b"v2")
    assert keys(s3) == ["p/template_index/index.usearch"]
    b = TableStore("s3://lake/p", working_copy=tmp_path / "b")
    assert (b.dir("template_index") / "index.usearch").read_bytes() == b"v2"
    assert not (b.dir("template_index") / "old.parquet").exists()


def test_a_failed_upload_keeps_the_previous_version_in_the_bucket_and_the_working_copy(s3, tmp_path, monkeypatch):
    store = TableStore("s3://lake/p", working_copy=tmp_path / "a")
    store.write("documents", pl.DataFrame({"doc_id": ["d1"]}), "s1")

    def refuse(*args, **kwargs):
        raise ConnectionError("network down")

    with monkeypatch.context() as mp, pytest.raises(ConnectionError):
        mp.setattr(store.mirror.client, "upload_file", refuse)
        store.write("documents", pl.DataFrame({"doc_id": ["d2"]}), "s1")
    assert store.read("documents", "s1")["doc_id"].to_list() == ["d1"]  # same host: still the published version
    fresh = TableStore("s3://lake/p", working_copy=tmp_path / "b")
    assert fresh.read("documents", "s1")["doc_id"].to_list() == ["d1"]
    assert [p.name for p in store.root.joinpath("documents").iterdir() if p.suffix == ".tmp"] == []


def test_the_index_folder_uploads_its_meta_last(s3, tmp_path, monkeypatch):
    store = TableStore("s3://lake/p", working_copy=tmp_path / "a")
    order = []
    real = store.mirror.client.upload_file
    monkeypatch.setattr(store.mirror.client, "upload_file",
                        lambda src, bucket, key: (order.append(key.rsplit("/", 1)[1]), real(src, bucket, key)))
    with store.staged_dir("template_index") as tmp:
        for name in ("meta.json", "id_map.parquet", "templates.usearch"):
            (tmp / name).write_bytes(b"x")
    assert order[-1] == "meta.json" and sorted(order) == ["id_map.parquet", "meta.json", "templates.usearch"]
