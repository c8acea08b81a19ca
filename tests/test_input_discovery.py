"""Real corpus layouts: a FineWeb-style nested corpus (data/<dump>/000_00000.parquet) on disk and under an
`s3://` prefix (moto server) is found by the sensors, one shard per file, and runs through the documents stage."""

from __future__ import annotations

import io
import json
from pathlib import Path

import polars as pl
import pytest
from dagster import DagsterInstance, SensorDefinition, SensorResult, SkipReason, build_sensor_context, materialize

from fineinstructions_dagster.defs.decontamination.assets import benchmark_ngrams
from fineinstructions_dagster.defs.documents.assets import (
    document_clusters,
    documents,
    duplicate_edges,
    filtered_documents,
)
from fineinstructions_dagster.defs.documents.sensors import corpus_shard_sensor
from fineinstructions_dagster.defs.partitions import EVERY_BUCKET_RANGE
from fineinstructions_dagster.defs.queries.sensors import query_source_sensor
from fineinstructions_dagster.defs.resources import InputsResource, build_resources
from fineinstructions_dagster.lib.storage import TableStore
from fineinstructions_dagster.sample import corpus_sections, faq_questions, find_doc_sources

# Two dumps, each holding a file named 000_00000.parquet (as FineWeb does): their texts come from different
# parts of the Python documentation, so a document's dump tells which file it was read from.
DUMPS = {"CC-MAIN-2024-10": "tutorial", "CC-MAIN-2024-18": "howto"}
KEYS = {f"data__{dump}__000_00000": dump for dump in DUMPS}


def fineweb_shard(dump: str, docs_folder: str) -> pl.DataFrame:
    """FineWeb's columns, texts of several paragraphs of English prose (>= 80 words)."""
    rows = [r for r in corpus_sections(find_doc_sources(), docs_folder) if len(r["text"].split()) >= 80][:6]
    return pl.DataFrame({
        "text": [r["text"] for r in rows],
        "id": [f"<urn:uuid:{dump}-{i:04d}>" for i in range(len(rows))],
        "dump": [dump] * len(rows),
        "url": [r["url"] for r in rows],
        "date": ["2024-03-01T00:00:00Z"] * len(rows),
        "file_path": [f"s3://commoncrawl/crawl-data/{dump}/segments/{i}.warc.gz" for i in range(len(rows))],
        "language": ["en"] * len(rows),
        "language_score": [0.95] * len(rows),
        "token_count": [len(r["text"].split()) for r in rows],
    })


@pytest.fixture(scope="module")
def fineweb() -> dict[str, bytes]:
    """Relative path -> content of a FineWeb-style dataset folder; its README is not data."""
    files = {"README.md": b"# FineWeb sample\n"}
    for dump, docs_folder in DUMPS.items():
        buf = io.BytesIO()
        fineweb_shard(dump, docs_folder).write_parquet(buf)
        files[f"data/{dump}/000_00000.parquet"] = buf.getvalue()
    return files


@pytest.fixture
def s3(moto_s3, fineweb):
    """The FineWeb folder under s3://corpus/fineweb, and query sources under s3://corpus/queries."""
    moto_s3.create_bucket(Bucket="corpus")
    for rel, body in fineweb.items():
        moto_s3.put_object(Bucket="corpus", Key=f"fineweb/{rel}", Body=body)
    questions = [json.dumps(q) for q in faq_questions(find_doc_sources())[:6]]
    moto_s3.put_object(Bucket="corpus", Key="queries/python_faq.jsonl", Body="\n".join(questions[:2]).encode())
    for i in (0, 1):  # a subfolder of files is one source
        moto_s3.put_object(Bucket="corpus", Key=f"queries/forum/part-{i}.jsonl",
                           Body="\n".join(questions[2 + 2 * i: 4 + 2 * i]).encode())
    return moto_s3


@pytest.fixture(autouse=True)
def _benchmarks_built(benchmarks_storage, monkeypatch):  # noqa: ANN001, ANN202 - the sensors wait for them
    monkeypatch.setenv("FINEINSTRUCTIONS_ROOT", benchmarks_storage.root)


def tick(sensor: SensorDefinition, instance: DagsterInstance, folder: str) -> SensorResult | SkipReason:
    with build_sensor_context(instance=instance, resources={
            **build_resources(), "inputs": InputsResource(queries_dir=folder, corpus_dir=folder)}) as ctx:
        result = sensor(ctx)
    for event in getattr(result, "asset_events", None) or []:  # recorded, as the daemon records them
        instance.report_runless_asset_event(event)
    return result


def new_keys(result: SensorResult | SkipReason) -> list[str]:
    assert isinstance(result, SensorResult), result
    keys = [r.partition_key for r in result.run_requests]
    assert list(result.dynamic_partitions_requests[0].partition_keys) == keys
    return keys


def test_nested_local_corpus_is_one_shard_per_file(tmp_path: Path, fineweb: dict[str, bytes]):
    for rel, body in fineweb.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(body)
    with DagsterInstance.ephemeral() as instance:
        assert new_keys(tick(corpus_shard_sensor, instance, str(tmp_path))) == sorted(KEYS)


def test_s3_corpus_and_query_folders_are_discovered(s3):
    with DagsterInstance.ephemeral() as instance:
        assert new_keys(tick(corpus_shard_sensor, instance, "s3://corpus/fineweb")) == sorted(KEYS)
        assert new_keys(tick(query_source_sensor, instance, "s3://corpus/queries")) == ["forum", "python_faq"]
        instance.add_dynamic_partitions("corpus_shard", sorted(KEYS))
        assert "no new or changed corpus_shard" in tick(corpus_shard_sensor, instance, "s3://corpus/fineweb").skip_message
        # A prefix or bucket with nothing in it yet is waited for, not an error.
        for missing in ("s3://corpus/not-yet", "s3://no-such-bucket/corpus"):
            assert "does not exist" in tick(corpus_shard_sensor, instance, missing).skip_message
            assert "does not exist" in tick(query_source_sensor, instance, missing).skip_message


def test_s3_corpus_runs_through_the_documents_stage(s3, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    for k, v in {"FINEINSTRUCTIONS_CORPUS": "s3://corpus/fineweb", "FINEINSTRUCTIONS_QUERIES": "s3://corpus/queries",
                 "FINEINSTRUCTIONS_ROOT": str(tmp_path / "root"), "FINEINSTRUCTIONS_PROFILE": "paper"}.items():
        monkeypatch.setenv(k, v)
    resources = build_resources()
    with DagsterInstance.ephemeral() as instance:
        assert materialize([benchmark_ngrams], instance=instance, resources=resources).success  # sensors wait for it
        keys = new_keys(tick(corpus_shard_sensor, instance, "s3://corpus/fineweb"))
        instance.add_dynamic_partitions("corpus_shard", keys)
        for key in keys:
            assert materialize([filtered_documents], partition_key=key, instance=instance,
                               resources=resources).success
        assert materialize([duplicate_edges, document_clusters, filtered_documents],
                           selection=["duplicate_edges", "document_clusters"], instance=instance,
                           resources=resources, tags=EVERY_BUCKET_RANGE).success
        for key in keys:
            assert materialize([documents, filtered_documents, document_clusters], selection=["documents"],
                               partition_key=key, instance=instance, resources=resources).success
    store = TableStore(tmp_path / "root")
    for key, dump in KEYS.items():
        docs = store.read("documents", key)
        source = fineweb_shard(dump, DUMPS[dump])
        assert docs.height >= 3, f"{key}: most of its documents should pass the quality filters"
        assert set(docs["shard"]) == {key} and set(docs["source_file"]) == {"000_00000.parquet"}
        # Read from this dump's file, not the other one of the same name.
        assert {json.loads(m)["dump"] for m in docs["metadata"]} == {dump}
        joined = docs.join(source, left_on="source_id", right_on="id", how="left", suffix="_source")
        assert joined["text"].to_list() == joined["text_source"].to_list()
        assert joined["url"].to_list() == joined["url_source"].to_list()
