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


def test_a_staged_folder_is_published_as_a_version_behind_a_pointer(s3, tmp_path):
    a = TableStore("s3://lake/p", working_copy=tmp_path / "a")
    s3.put_object(Bucket="lake", Key="p/template_index/meta.json", Body=b"unversioned layout")
    for n in (1, 2, 3):
        with a.staged_dir("template_index", label=f"i{n}") as tmp:
            (tmp / "index.usearch").write_bytes(f"v{n}".encode())
            if n == 1:
                (tmp / "old.parquet").write_bytes(b"x")
    current = a.dir("template_index").name
    objects = keys(s3)
    # the pointer, the current version and the one it replaced; older versions and loose files are gone
    assert "p/template_index/CURRENT" in objects and len(objects) == 3 and current.endswith("-i3")
    assert f"p/template_index/{current}/index.usearch" in objects
    assert not any("old.parquet" in k or k.endswith("/meta.json") for k in objects)
    b = TableStore("s3://lake/p", working_copy=tmp_path / "b")
    assert (b.dir("template_index") / "index.usearch").read_bytes() == b"v3"
    with a.staged_dir("template_index", label="i4") as tmp:
        (tmp / "index.usearch").write_bytes(b"v4")
    assert (b.dir("template_index") / "index.usearch").read_bytes() == b"v4"
    # the reader's working copy keeps only the versions the bucket still holds
    assert sorted(p.name for p in b.root.joinpath("template_index").iterdir() if p.is_dir()) == sorted(
        {k.split("/")[2] for k in keys(s3) if k.count("/") == 3})


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


def test_the_index_version_uploads_its_meta_last_and_the_pointer_after(s3, tmp_path, monkeypatch):
    store = TableStore("s3://lake/p", working_copy=tmp_path / "a")
    order = []
    real = store.mirror.client.upload_file
    monkeypatch.setattr(store.mirror.client, "upload_file",
                        lambda src, bucket, key: (order.append(key.rsplit("/", 1)[1]), real(src, bucket, key)))
    with store.staged_dir("template_index") as tmp:
        for name in ("meta.json", "id_map.parquet", "templates.usearch"):
            (tmp / name).write_bytes(b"x")
    # the version's files first, its meta last among them, then the pointer that makes it current
    assert order == ["id_map.parquet", "templates.usearch", "meta.json", "CURRENT"]


def test_a_failed_version_upload_keeps_the_pointer_on_the_previous_version(s3, tmp_path, monkeypatch):
    store = TableStore("s3://lake/p", working_copy=tmp_path / "a")
    with store.staged_dir("template_index") as tmp:
        (tmp / "meta.json").write_bytes(b"v1")
    real = store.mirror.client.upload_file

    def fail_on_pointer(src, bucket, key):
        if key.endswith("/CURRENT"):
            raise ConnectionError("network down")
        real(src, bucket, key)

    with monkeypatch.context() as mp, pytest.raises(ConnectionError), store.staged_dir("template_index") as tmp:
        mp.setattr(store.mirror.client, "upload_file", fail_on_pointer)
        (tmp / "meta.json").write_bytes(b"v2")
    assert (store.dir("template_index") / "meta.json").read_bytes() == b"v1"
    fresh = TableStore("s3://lake/p", working_copy=tmp_path / "b")
    assert (fresh.dir("template_index") / "meta.json").read_bytes() == b"v1"
