"""The documents stage as Dagster runs it: streamed shards, bad files, and cross-shard dedup in any order."""

from __future__ import annotations

import gzip
import json
import random

import polars as pl
import pytest
from dagster import DagsterInstance, materialize

from fineinstructions_dagster.defs.decontamination.assets import benchmark_ngrams
from fineinstructions_dagster.defs.documents.assets import (
    document_clusters,
    documents,
    duplicate_edges,
    filtered_documents,
)
from fineinstructions_dagster.defs.resources import InputsResource, PipelineResource, StorageResource
from fineinstructions_dagster.lib.storage import TableStore
from fineinstructions_dagster.runner import EVERY_BUCKET_RANGE

random.seed(3)
WORDS = ("the of and to in is that it with as for was on are be this by have from or at which one an all "
         "river forest mountain valley city garden library museum harbour bridge station market school "
         "teacher student farmer doctor writer painter engineer sailor walks reads builds paints studies "
         "quickly slowly carefully often rarely always never today yesterday tomorrow").split()


def article(seed: int, n: int = 120) -> str:
    rng = random.Random(seed)
    sentences = []
    for _ in range(n // 12):
        sentences.append(" ".join(rng.choice(WORDS) for _ in range(12)).capitalize() + ".")
    return " ".join(sentences)


def near_copy(text: str) -> str:
    words = text.split()
    words[5] = "lighthouse"
    return " ".join(words)


@pytest.fixture
def corpus(tmp_path):
    folder = tmp_path / "corpus"
    folder.mkdir()
    a = [{"id": f"a{i}", "text": article(i), "url": f"https://a.example/{i}"} for i in range(6)]
    pl.DataFrame([*a, {"id": "a-short", "text": "far too short", "url": "https://a.example/s"}]).write_parquet(
        folder / "shard-a.parquet")
    lines = [json.dumps({"id": "b0", "text": near_copy(a[2]["text"]), "url": "https://b.example/0"}),
             '{"id": "b1", "text": "broken',
             json.dumps({"id": "b2", "text": article(100), "url": "https://b.example/2"})]
    (folder / "shard-b.jsonl.gz").write_bytes(gzip.compress(("\n".join(lines) + "\n").encode()))
    (folder / "shard-empty.jsonl").write_text("")
    (folder / "shard-bad.parquet").write_bytes(b"PAR1 definitely not parquet")
    return folder


def dedup(instance, resources) -> None:
    """Every bucket range in one run (the partition-range tags the runner uses), then the components."""
    assert materialize([duplicate_edges, document_clusters, filtered_documents],
                       selection=["duplicate_edges", "document_clusters"], instance=instance, resources=resources,
                       tags=EVERY_BUCKET_RANGE).success


def run(corpus, root, order: list[str]):
    resources = {"storage": StorageResource(root=str(root)),
                 "inputs": InputsResource(queries_dir=str(corpus), corpus_dir=str(corpus)),
                 "pipeline": PipelineResource(profile="paper")}
    instance = DagsterInstance.ephemeral()
    assert materialize([benchmark_ngrams], instance=instance, resources=resources).success  # read by the filter
    instance.add_dynamic_partitions("corpus_shard", order)
    results = {s: materialize([filtered_documents], partition_key=s, instance=instance, resources=resources,
                              raise_on_error=False) for s in order}
    good = [s for s in order if results[s].success]
    instance.delete_dynamic_partition("corpus_shard", "shard-bad")
    dedup(instance, resources)
    for s in good:
        assert materialize([documents, filtered_documents, document_clusters], selection=["documents"],
                           partition_key=s, instance=instance, resources=resources).success
    return results, TableStore(root)


@pytest.mark.parametrize("order", [["shard-a", "shard-b", "shard-empty", "shard-bad"],
                                   ["shard-bad", "shard-empty", "shard-b", "shard-a"]])
def test_cross_shard_near_duplicate_found_whichever_shard_runs_first(corpus, tmp_path, order):
    results, store = run(corpus, tmp_path / f"root-{order[0]}", order)
    # Which copy of the pair (a2, b0) stays is the smallest doc_id's: fixed, whatever order the shards ran in.
    removed = pl.concat([store.read("documents", s, quarantine=True) for s in ("shard-a", "shard-b")],
                        how="diagonal_relaxed")
    kept = pl.concat([store.read("documents", s) for s in ("shard-a", "shard-b")])
    assert removed["reason"].to_list() == ["near_duplicate"] and removed["source_id"][0] in ("a2", "b0")
    other = "b0" if removed["source_id"][0] == "a2" else "a2"
    assert removed["duplicate_of"][0] == kept.filter(pl.col("source_id") == other)["doc_id"][0]
    assert "b2" in kept["source_id"].to_list()


def test_bad_file_fails_only_its_shard_with_a_clear_error(corpus, tmp_path):
    results, store = run(corpus, tmp_path / "root", ["shard-a", "shard-bad", "shard-b", "shard-empty"])
    assert not results["shard-bad"].success
    failure = [e for e in results["shard-bad"].all_events if e.is_step_failure][0]
    message = failure.step_failure_data.error.to_string()  # includes the cause chain
    assert "shard-bad.parquet: not a readable Parquet file" in message
    assert all(results[s].success for s in ("shard-a", "shard-b", "shard-empty"))
    assert not store.exists("filtered_documents", "shard-bad")


def test_broken_jsonl_line_is_counted_and_empty_shard_is_empty(corpus, tmp_path):
    results, store = run(corpus, tmp_path / "root", ["shard-a", "shard-b", "shard-empty"])
    mats = {e.asset_key.to_user_string(): e.step_materialization_data.materialization.metadata
            for e in results["shard-b"].get_asset_materialization_events()}
    assert mats["filtered_documents"]["dropped_malformed_json"].value == 1
    bad = store.read("filtered_documents", "shard-b", quarantine=True)
    assert bad.filter(pl.col("reason") == "malformed_json")["source_row"].to_list() == [2]
    assert store.read("filtered_documents", "shard-empty").height == 0
    assert store.read("documents", "shard-empty").height == 0


def test_shard_is_streamed_in_batches_with_the_same_result(corpus, tmp_path):
    from fineinstructions_dagster.config import DocumentFilterConfig
    from fineinstructions_dagster.stages.dedup import MinhashConfig
    from fineinstructions_dagster.stages.documents import prepare_shard

    files = [str(corpus / "shard-a.parquet")]
    whole = prepare_shard(files, "a", DocumentFilterConfig(), MinhashConfig(), tmp_path, batch_rows=100)
    (tmp_path / "small").mkdir()
    small = prepare_shard(files, "a", DocumentFilterConfig(), MinhashConfig(), tmp_path / "small", batch_rows=2)
    assert len(small.kept) == 3 and len(whole.kept) == 1
    assert pl.read_parquet(small.kept).equals(pl.read_parquet(whole.kept))
    assert pl.read_parquet(small.signatures).equals(pl.read_parquet(whole.signatures))


def test_document_lookup_says_why_a_document_is_gone(corpus, tmp_path):
    from fineinstructions_dagster.stages.lineage import trace_document

    _, store = run(corpus, tmp_path / "root", ["shard-a", "shard-b"])
    a2, b0 = trace_document(store, "a2"), trace_document(store, "b0")
    gone, stays = (a2, b0) if a2["status"] != "kept" else (b0, a2)
    assert gone["status"] == "removed as duplicate" and gone["reason"] == "near_duplicate"
    assert gone["duplicate_of"] == stays["doc_id"] and stays["status"] == "kept"
    assert trace_document(store, "https://b.example/2")["status"] == "kept"
    short = trace_document(store, "a-short")
    assert short["status"] == "dropped by a filter" and short["reason"] == "too_short" and short["doc_id"]


def test_documents_refuse_dedup_decisions_made_for_another_version_of_the_shard(corpus, tmp_path):
    resources = {"storage": StorageResource(root=str(tmp_path / "root")),
                 "inputs": InputsResource(queries_dir=str(corpus), corpus_dir=str(corpus)),
                 "pipeline": PipelineResource(profile="paper")}
    instance = DagsterInstance.ephemeral()
    assert materialize([benchmark_ngrams], instance=instance, resources=resources).success
    instance.add_dynamic_partitions("corpus_shard", ["shard-a", "shard-b"])
    for s in ("shard-a", "shard-b"):
        assert materialize([filtered_documents], partition_key=s, instance=instance, resources=resources).success
    assert materialize([duplicate_edges, document_clusters, filtered_documents],
                       selection=["duplicate_edges", "document_clusters"], instance=instance, resources=resources,
                       tags=EVERY_BUCKET_RANGE).success
    # shard-a re-filtered after the decisions: its documents step refuses them until dedup runs again
    assert materialize([filtered_documents], partition_key="shard-a", instance=instance, resources=resources).success
    stale = materialize([documents, filtered_documents, document_clusters], selection=["documents"],
                        partition_key="shard-a", instance=instance, resources=resources, raise_on_error=False)
    assert not stale.success
    failure = next(e for e in stale.all_events if e.is_step_failure)
    assert "has no dedup decisions for its current filtered_documents" in failure.step_failure_data.error.to_string()
    assert materialize([documents, filtered_documents, document_clusters], selection=["documents"],
                       partition_key="shard-b", instance=instance, resources=resources).success
