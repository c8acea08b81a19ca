"""The declared asset graph is the data flow: each asset's declared upstream keys are exactly the tables its code
reads from the storage root (recorded while it runs), so the graph in the UI is the real one."""

from __future__ import annotations

import pytest
from dagster import AssetKey, materialize

from fineinstructions_dagster.lib.storage import TableStore

PRIVATE = ("_parts", "_cache", "_quality", "_scratch", "quarantine")


def _table(name: object) -> str:
    return str(name).split("/")[0]



@pytest.fixture(scope="module")
def pipeline(pipeline_copy):  # noqa: ANN001, ANN201 - these tests run steps again and change the data
    return pipeline_copy

@pytest.fixture
def reads(monkeypatch):
    """Every table name a TableStore is asked to read (or to locate) while the fixture is active."""
    seen: set[str] = set()
    for method in ("read", "file", "glob", "glob_if_any", "scan_all", "read_json", "dir", "exists", "partitions",
                   "path"):
        original = getattr(TableStore, method)

        def spy(self, name, *args, _original=original, **kwargs):
            seen.add(_table(name))
            return _original(self, name, *args, **kwargs)

        monkeypatch.setattr(TableStore, method, spy)
    return seen


def test_each_asset_declares_exactly_the_tables_it_reads(pipeline, reads):
    from fineinstructions_dagster.definitions import ASSETS, defs
    from fineinstructions_dagster.defs.partitions import EVERY_BUCKET_RANGE
    from fineinstructions_dagster.defs.resources import build_resources

    _, instance, run = pipeline
    graph = defs.resolve_asset_graph()
    assets, resources = list(ASSETS), build_resources()
    # the export first: its gate needs the dbt build to be newer than the pairs the later steps rewrite
    order = ["export_chat", "user_queries", "templates", "template_bank", "template_index",
             "filtered_documents", "duplicate_edges", "document_clusters", "documents", "matches", "instantiations",
             "judgements", "fineinstructions", "dataset_report"]
    mismatched = []
    for name in order:
        node = graph.get(AssetKey(name))
        spec = node.partitions_def
        partition, tags = None, {}
        if spec is not None and name in ("user_queries", "templates"):
            partition = run.sources[0]
        elif name == "duplicate_edges":
            tags = EVERY_BUCKET_RANGE
        elif spec is not None:
            partition = "faq"
        # a multi-asset's outputs are materialized together
        outputs = {k.to_user_string() for k in defs.resolve_assets_def(name).keys}
        reads.clear()
        result = materialize(assets, selection=sorted(outputs), partition_key=partition, instance=instance,
                             resources=resources, tags=tags)
        assert result.success, name
        read = {t for t in reads if not t.startswith(PRIVATE) and t not in outputs}
        # (the observed inputs and removal lists are data versions of files, not tables the step reads)
        declared = {k.to_user_string() for key in outputs for k in graph.get(AssetKey(key)).parent_keys
                    if k.path[0] != "quality" and graph.get(k).is_materializable} - outputs
        if read != declared:
            mismatched.append(f"{name}: reads {sorted(read)}, declares {sorted(declared)}")
    assert mismatched == []
