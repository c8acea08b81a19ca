import polars as pl
import pytest

from fineinstructions_dagster.lib.storage import TableStore


def test_write_replaces_partition_whole_and_leaves_no_temp_files(tmp_path):
    store = TableStore(tmp_path)
    store.write("t", pl.DataFrame({"x": [1, 2, 3]}), "p1")
    store.write("t", pl.DataFrame({"x": [9]}), "p1")
    assert store.read("t", "p1")["x"].to_list() == [9]
    assert [p.name for p in (tmp_path / "t").iterdir()] == ["p1.parquet"]


def test_failed_write_keeps_the_previous_partition(tmp_path):
    store = TableStore(tmp_path)
    store.write("t", pl.DataFrame({"x": [1]}), "p1")

    class Boom(pl.DataFrame):
        def write_parquet(self, *a, **k):  # simulate a crash midway through writing
            raise RuntimeError("killed")

    with pytest.raises(RuntimeError):
        store.write("t", Boom({"x": [2]}), "p1")
    assert store.read("t", "p1")["x"].to_list() == [1]
    assert [p.name for p in (tmp_path / "t").iterdir()] == ["p1.parquet"]


def test_unsafe_partition_key_and_missing_table_are_clear_errors(tmp_path):
    store = TableStore(tmp_path)
    with pytest.raises(ValueError, match="not a safe file name"):
        store.path("t", "../etc")
    with pytest.raises(FileNotFoundError, match="'t' partition 'p' is not materialized"):
        store.read("t", "p")


def test_staged_dir_swaps_whole_folder(tmp_path):
    store = TableStore(tmp_path)
    with store.staged_dir("idx") as d:
        (d / "a").write_text("1")
    with pytest.raises(RuntimeError), store.staged_dir("idx") as d:
        (d / "a").write_text("2")
        raise RuntimeError("crash while building")
    assert (tmp_path / "idx" / "a").read_text() == "1"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["idx"]
