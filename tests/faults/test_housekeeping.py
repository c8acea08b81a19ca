"""Housekeeping under real processes: a writer SIGKILLed mid-write leaves leftovers that the next store sweeps
(and a live concurrent writer's are kept), published files follow the process umask, and a template index
re-run with nothing new keeps its id and parent."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import polars as pl
import pytest
from dagster import materialize

from fineinstructions_dagster.defs.matching.assets import INDEX_DIR, template_index
from fineinstructions_dagster.defs.resources import EmbedderResource, PipelineResource, StorageResource
from fineinstructions_dagster.lib.storage import TableStore
from fineinstructions_dagster.stages.matching import read_index_meta

# Opens a scratch folder and a staged index folder, then stops midway through writing partition s1.
KILLED_WRITER = """
import sys, time
from contextlib import ExitStack
import polars as pl
from fineinstructions_dagster.lib.storage import TableStore

class Stuck(pl.DataFrame):
    def write_parquet(self, path, **kw):
        with open(path, "wb") as f:
            f.write(b"PAR1 half a partition")
        print("ready", flush=True)
        time.sleep(600)

store = TableStore(sys.argv[1])
with ExitStack() as stack:
    (stack.enter_context(store.scratch("documents-s1")) / "part-000000.parquet").write_bytes(b"part")
    (stack.enter_context(store.staged_dir("template_index")) / "meta.json").write_text("{}")
    store.write("documents", Stuck({"doc_id": ["new"]}), "s1")
"""


def _leftovers(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob(".tmp-*"))


def test_a_writer_killed_midway_is_swept_by_the_next_store_and_the_published_partition_stays(tmp_path):
    TableStore(tmp_path).write("documents", pl.DataFrame({"doc_id": ["d1", "d2"]}), "s1")
    child = subprocess.Popen([sys.executable, "-c", KILLED_WRITER, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "ready"
        left = _leftovers(tmp_path)
        assert {p.relative_to(tmp_path).parts[0] for p in left} == {".scratch", "documents", "template_index"}
        assert all(p.name.startswith(f".tmp-{child.pid}@") for p in left)
        # a concurrent run on the same root keeps the live writer's files
        assert TableStore(tmp_path).swept == 0 and _leftovers(tmp_path) == left
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    assert child.returncode == -signal.SIGKILL
    assert _leftovers(tmp_path) == left  # SIGKILL runs no cleanup
    store = TableStore(tmp_path)
    assert store.swept == 3 and _leftovers(tmp_path) == []
    assert store.read("documents", "s1")["doc_id"].to_list() == ["d1", "d2"]
    assert store.partitions("documents") == ["s1"] and store.dir(INDEX_DIR) == tmp_path / INDEX_DIR


WRITE_UNDER_UMASK = """
import json, os, sys
os.umask(int(sys.argv[2], 8))
import polars as pl
from fineinstructions_dagster.lib.storage import TableStore

store = TableStore(sys.argv[1])
part = store.write("documents", pl.DataFrame({"x": [1]}), "s1")
report = store.write_json("dataset_report/report.json", {})
with store.staged_dir("template_index") as d:
    (d / "meta.json").write_text("{}")
version = store.dir("template_index")
modes = [part, report, version / "meta.json", version.parent / "CURRENT", version]
print(json.dumps([oct(os.stat(p).st_mode & 0o777) for p in modes]))
"""


@pytest.mark.parametrize(("umask", "file_mode", "dir_mode"), [
    (0o022, 0o644, 0o755), (0o002, 0o664, 0o775), (0o077, 0o600, 0o700)])
def test_published_files_follow_the_process_umask(tmp_path, umask, file_mode, dir_mode):
    out = subprocess.run([sys.executable, "-c", WRITE_UNDER_UMASK, str(tmp_path), oct(umask)], capture_output=True,
                         text=True, check=True)
    assert json.loads(out.stdout) == [oct(file_mode)] * 4 + [oct(dir_mode)]


BANK = pl.DataFrame({"template_id": ["t1", "t2", "t3"], "compatible_document_description": [
    "A tutorial about sorting lists in Python.", "A recipe for sourdough bread.", "An article about TCP sockets."]})


def _materialize_index(root: Path) -> dict[str, object]:
    result = materialize([template_index], resources={
        "storage": StorageResource(root=str(root)), "embedder": EmbedderResource(),
        "pipeline": PipelineResource()})
    return {k: v.value for k, v in result.asset_materializations_for_node("template_index")[0].metadata.items()}


def test_an_index_re_run_with_nothing_new_keeps_its_version_id_and_parent(tmp_path):
    store = TableStore(tmp_path)
    store.write("template_bank", BANK)
    first = _materialize_index(tmp_path)
    version = store.dir(INDEX_DIR)
    saved = (version / "meta.json").read_text()
    again = _materialize_index(tmp_path)
    assert (first["build"], again["build"]) == ("full", "unchanged")
    assert again["index_id"] == first["index_id"] and again["parent_index_id"] == first["parent_index_id"] == ""
    assert store.dir(INDEX_DIR) == version and (version / "meta.json").read_text() == saved  # nothing republished
    store.write("template_bank", pl.concat([BANK, pl.DataFrame({
        "template_id": ["t4"], "compatible_document_description": ["A guide to brewing coffee."]})]))
    grown = _materialize_index(tmp_path)
    meta = read_index_meta(store.dir(INDEX_DIR))
    assert (grown["build"], meta.added, meta.parent_index_id) == ("incremental", 1, first["index_id"])
    assert meta.index_id != meta.parent_index_id and store.dir(INDEX_DIR) != version
    assert version.exists()  # the replaced version stays for readers that opened it before the switch
    assert _materialize_index(tmp_path)["parent_index_id"] == first["index_id"]  # unchanged again: same parent
    assert json.loads((store.dir(INDEX_DIR) / "meta.json").read_text())["parent_index_id"] == first["index_id"]
    assert not any(p.name.startswith(".tmp-") for p in (tmp_path / INDEX_DIR).iterdir())
    assert os.listdir(tmp_path / INDEX_DIR).count("CURRENT") == 1
