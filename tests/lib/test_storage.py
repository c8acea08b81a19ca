import os
import subprocess
import sys
import time

import polars as pl
import pytest

from fineinstructions_dagster.lib import storage
from fineinstructions_dagster.lib.storage import TableStore, sweep_leftovers


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


def test_staged_dir_publishes_versions_behind_one_pointer(tmp_path):
    store = TableStore(tmp_path)
    with store.staged_dir("idx", label="i1") as d:
        (d / "a").write_text("1")
    first = store.dir("idx")
    assert first.parent == tmp_path / "idx" and first.name.startswith("v-") and first.name.endswith("-i1")
    assert (tmp_path / "idx" / "CURRENT").read_text().strip() == first.name
    with pytest.raises(RuntimeError), store.staged_dir("idx") as d:
        (d / "a").write_text("2")
        raise RuntimeError("crash while building")
    assert (store.dir("idx") / "a").read_text() == "1"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["idx"]
    for n in (2, 3):
        with store.staged_dir("idx") as d:
            (d / "a").write_text(str(n))
    assert (store.dir("idx") / "a").read_text() == "3"
    # the replaced version stays for readers that resolved the pointer just before the switch; older ones go
    versions = sorted(p.name for p in (tmp_path / "idx").iterdir() if p.name.startswith("v-"))
    assert len(versions) == 2 and first.name not in versions and versions[-1] == store.dir("idx").name
    assert [p.name for p in (tmp_path / "idx").iterdir() if p.name.startswith(".tmp-")] == []


def test_an_unversioned_folder_becomes_versioned_and_loses_its_loose_files(tmp_path):
    (tmp_path / "idx").mkdir()
    (tmp_path / "idx" / "meta.json").write_text("old layout")
    store = TableStore(tmp_path)
    assert store.dir("idx") == tmp_path / "idx"  # no pointer: the folder itself
    with store.staged_dir("idx") as d:
        (d / "meta.json").write_text("new")
    assert (store.dir("idx") / "meta.json").read_text() == "new"
    assert not (tmp_path / "idx" / "meta.json").exists()


def test_published_files_are_fsynced_before_the_rename_and_their_folder_after(tmp_path, monkeypatch):
    events: list[str] = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: (events.append(
        "dir" if os.path.isdir(f"/proc/self/fd/{fd}") else "file"), real_fsync(fd))[1])
    monkeypatch.setattr(os, "replace", lambda a, b: (events.append("rename"), real_replace(a, b))[1])
    TableStore(tmp_path).write("t", pl.DataFrame({"x": [1]}), "p1")
    assert events == ["file", "rename", "dir"]


def test_published_files_follow_the_umask_not_mkstemp(tmp_path):
    store = TableStore(tmp_path)
    mode = 0o666 & ~storage._umask()
    assert (store.write("t", pl.DataFrame({"x": [1]})).stat().st_mode & 0o777) == mode
    assert (store.write_json("r/report.json", {}).stat().st_mode & 0o777) == mode
    with store.staged_dir("idx") as d:
        (d / "a").write_text("1")
    assert (store.dir("idx").stat().st_mode & 0o777) == 0o777 & ~storage._umask()
    assert ((tmp_path / "idx" / "CURRENT").stat().st_mode & 0o777) == mode


def _leftover(folder, name: str, age_s: float = 0.0, is_dir: bool = False):
    p = folder / name
    p.mkdir(parents=True) if is_dir else (p.parent.mkdir(parents=True, exist_ok=True), p.write_text("partial"))
    if age_s:
        os.utime(p, (time.time() - age_s, time.time() - age_s))
    return p


def test_sweep_removes_only_leftovers_of_writers_that_are_gone(tmp_path):
    host = storage._HOST
    other = "0" * 8 if host != "0" * 8 else "1" * 8
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead = int(done.stdout)
    t = tmp_path / "t"
    live = [_leftover(t, f".tmp-{os.getpid()}@{host}.p1.parquet.abc.tmp"),  # this (live) process
            _leftover(t, f".tmp-{dead}@{other}.p2.parquet.abc.tmp"),  # another host, recent
            _leftover(tmp_path / ".scratch", "docs-s1.abcdefgh", is_dir=True),  # old name, recent
            _leftover(t, "p3.parquet"), _leftover(t, ".s3-etags.json", age_s=1e6),  # not temporary
            _leftover(t, ".notes.abcdefgh", age_s=2 * storage.STALE_AFTER_S)]  # a file, not a staged folder
    gone = [_leftover(t, f".tmp-{dead}@{host}.p4.parquet.abc.tmp"),  # dead process on this host
            _leftover(tmp_path / "quarantine" / "t", f".tmp-{dead}@{host}.p5.parquet.x.tmp"),
            _leftover(tmp_path / "idx", f".tmp-{dead}@{host}.staged.abc", is_dir=True),
            _leftover(t, f".tmp-{dead}@{other}.p6.parquet.abc.tmp", age_s=2 * storage.STALE_AFTER_S),
            _leftover(tmp_path / ".scratch", "docs-s2.abcdefgh", age_s=2 * storage.STALE_AFTER_S, is_dir=True),
            _leftover(t, ".p7.parquet.abcdefgh.tmp", age_s=2 * storage.STALE_AFTER_S),
            _leftover(tmp_path, ".idx.abcdefgh", age_s=2 * storage.STALE_AFTER_S, is_dir=True),
            _leftover(tmp_path, ".idx.old", age_s=2 * storage.STALE_AFTER_S, is_dir=True),
            # our pid, but last written before this process started: a dead process whose pid was reused
            _leftover(t, f".tmp-{os.getpid()}@{host}.p8.parquet.abc.tmp", age_s=time.time() - storage._process(
                os.getpid())[1] + 60)]
    assert TableStore(tmp_path).swept == len(gone)
    assert all(p.exists() for p in live) and not any(p.exists() for p in gone)
    assert sweep_leftovers(tmp_path) == 0


def test_a_new_scratch_sweeps_dead_runs_scratch(tmp_path):
    store = TableStore(tmp_path)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    old = _leftover(tmp_path / ".scratch", f".tmp-{int(dead.stdout)}@{storage._HOST}.docs.abc", is_dir=True)
    with store.scratch("docs") as d:
        assert d.name.startswith(f".tmp-{os.getpid()}@") and not old.exists()
    assert list((tmp_path / ".scratch").iterdir()) == []
