"""Adding a shard after the others ran to the end: only the new shard's chain runs, the older shards' pairs
and their dedup decisions stay put, and the newcomer's copies of older documents are removed naming them."""

from __future__ import annotations

import shutil

import polars as pl
import pytest
from dagster import AssetKey, DagsterInstance

from fineinstructions_dagster.lib.storage import TableStore
from fineinstructions_dagster.runner import SHARD_STEP, run_pipeline
from fineinstructions_dagster.sample import build_sample
from tests.conftest import smoke_env

pytestmark = [pytest.mark.slow]  # runs the whole graph three times

OLD = ["faq", "tutorial"]
PER_SHARD = [*SHARD_STEP, "export_chat", "export_packed"]


def materializations(instance: DagsterInstance) -> dict[tuple[str, str], int]:
    out: dict[tuple[str, str], int] = {}
    for asset in PER_SHARD:
        for record in instance.fetch_materializations(AssetKey(asset), limit=1000).records:
            key = (asset, record.partition_key or "-")
            out[key] = out.get(key, 0) + 1
    return out


def test_a_new_shard_runs_alone_and_its_copies_of_older_documents_are_removed(tmp_path, smoke_model,
                                                                               sample_inputs, monkeypatch):
    inputs = tmp_path / "inputs"
    shutil.copytree(sample_inputs, inputs)
    root = tmp_path / "root"
    for k, v in smoke_env(root, smoke_model, inputs).items():
        monkeypatch.setenv(k, v)
    instance = DagsterInstance.ephemeral()
    first = run_pipeline(instance, log=lambda _: None)
    assert first.ok and first.shards == OLD
    store = TableStore(root)
    before = materializations(instance)
    assert {k for k in before} == {(a, s) for a in PER_SHARD for s in OLD}
    lists_before = {s: store.read("document_clusters", s) for s in OLD}
    pairs_before = {s: store.read("fineinstructions", s) for s in OLD}

    # The new shard: a few documents of its own, an exact copy of a kept faq document and a near copy of a
    # kept tutorial document (one word changed), under urls and ids of its own.
    build_sample(tmp_path / "more", shards=("howto",), max_docs_per_shard=4)
    fresh = pl.read_parquet(tmp_path / "more" / "corpus" / "howto.parquet")
    faq_doc = store.read("documents", "faq").sort("n_words", descending=True).row(0, named=True)
    tut_doc = store.read("documents", "tutorial").sort("n_words", descending=True).row(0, named=True)
    words = tut_doc["text"].split(" ")
    words[len(words) // 2] = "lighthouse"
    copies = pl.DataFrame([
        {**fresh.row(0, named=True), "id": "copy-of-faq", "url": "https://mirror.example/faq", "text": faq_doc["text"]},
        {**fresh.row(0, named=True), "id": "near-copy", "url": "https://mirror.example/tut", "text": " ".join(words)},
    ])
    pl.concat([fresh, copies]).write_parquet(inputs / "corpus" / "howto.parquet")

    second = run_pipeline(instance, log=lambda _: None)
    assert second.ok, [f.describe() for f in second.failures]
    for shard in OLD:
        for name in ("filter", "shard", "export"):
            assert f"{name} [{shard}]" in second.current, (name, shard, second.current)
    # Not one new materialization of the older shards' documents .. fineinstructions (nor their exports).
    after = materializations(instance)
    assert {k: n for k, n in after.items() if k[1] in OLD} == before
    assert all(after[(a, "howto")] == 1 for a in PER_SHARD)
    for shard in OLD:
        assert store.read("document_clusters", shard).equals(lists_before[shard])
        assert store.read("fineinstructions", shard).equals(pairs_before[shard])
    clusters = instance.fetch_materializations(AssetKey("document_clusters"), limit=1).records[0]
    assert clusters.asset_materialization.metadata["changed_shards"].value == "howto"

    removed = store.read("documents", "howto", quarantine=True)
    by_source = {r["source_id"]: r for r in removed.iter_rows(named=True)}
    assert by_source["copy-of-faq"]["duplicate_of"] == faq_doc["doc_id"]
    assert (by_source["copy-of-faq"]["duplicate_of_shard"], by_source["copy-of-faq"]["reason"]) == (
        "faq", "exact_duplicate")
    assert by_source["near-copy"]["duplicate_of"] == tut_doc["doc_id"]
    assert by_source["near-copy"]["reason"] == "near_duplicate" and by_source["near-copy"]["similarity"] > 0.8
    kept = store.read("documents", "howto")
    assert kept.height >= 1 and not set(kept["source_id"]) & {"copy-of-faq", "near-copy"}

    # A third run with nothing new runs nothing.
    third = run_pipeline(instance, log=lambda _: None)
    assert third.ok and materializations(instance) == after
    # benchmarks, queries, index, 3 filters, dedup, 3 chains, quality, 3 exports, report: all current
    assert len(third.current) == 15 and {"benchmarks", "dedup", "quality", "report", "shard [howto]"} <= set(
        third.current)

