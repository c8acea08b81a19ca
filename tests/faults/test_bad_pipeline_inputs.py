"""Bad inputs through the whole graph, the way `make run` meets them: a corrupt shard, a broken query source,
an empty file and a 0-row Parquet shard, a file holding the same row twice and an unsupported file, next to the
good sample. One run of `fineinstructions run` (real processes, real files, dbt): every good shard goes all the
way to its export, the report is written, each bad input is named in an error or counted with a reason, and
the run ends non-zero with a summary. Also: a batched (multi-partition) run records the partitions that
succeeded and fails only the bad one."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import polars as pl
import pytest
from dagster import AssetCheckKey, AssetKey, AssetRecordsFilter, DagsterInstance, materialize

from fineinstructions_dagster.llm.engines import vllm_available
from tests.faults.conftest import cli_env, new_home, run_cli

pytestmark = [pytest.mark.slow]
GOOD_SHARDS = ["faq", "tutorial"]
ODD_SHARDS = ["empty", "blank", "dups"]  # odd but valid: they must flow through like the good ones


@pytest.fixture(scope="module")
def bad_run(tmp_path_factory, smoke_model, sample_inputs):
    base = tmp_path_factory.mktemp("bad-inputs")
    inputs = base / "inputs"
    shutil.copytree(sample_inputs, inputs)
    corpus, queries = inputs / "corpus", inputs / "queries"
    faq = pl.read_ndjson(corpus / "faq.jsonl")
    faq.head(0).write_parquet(corpus / "empty.parquet")  # 0 rows, real columns
    (corpus / "blank.jsonl").write_bytes(b"")  # an empty file
    (corpus / "corrupt.parquet").write_bytes(b"PAR1 this is not parquet at all")
    # Texts of this file only (words of sample pages in reverse order: real words, no shingle shared with them).
    mine = [" ".join(reversed(faq["text"][i].split())) for i in (3, 5)]
    row = json.dumps({"text": mine[0], "url": "https://dup.example/1"})
    (corpus / "dups.jsonl").write_text("\n".join([row, row, json.dumps({"text": mine[1]})]) + "\n")
    (corpus / "notes.csv").write_text("text\nnot a supported format\n")
    (queries / "broken.parquet").write_bytes(b"not parquet")
    home, root = new_home(base / "home"), base / "root"
    backend = "vllm" if vllm_available() else "transformers"
    done = run_cli(cli_env(home, root, inputs, smoke_model, backend))
    return done, root, home


def test_run_goes_on_past_bad_partitions_and_ends_with_a_summary(bad_run):
    done, _, _ = bad_run
    assert done.returncode == 1, done.stdout[-3000:] + done.stderr[-3000:]
    err = done.stderr
    assert "2 step(s) failed" in err
    assert "queries [broken]" in err and "broken.parquet: not a readable Parquet file" in err
    assert "filter [corrupt]" in err and "corrupt.parquet: not a readable Parquet file" in err
    assert "shard [corrupt]" in err  # listed as not run because of them
    assert "Traceback" not in err


def test_every_other_shard_reaches_its_export_and_the_report(bad_run):
    done, root, _ = bad_run
    assert "FAILED quality" not in done.stdout and "FAILED export" not in done.stdout  # dbt passed
    for shard in GOOD_SHARDS + ODD_SHARDS:
        assert (root / "export_chat" / f"{shard}.parquet").exists(), shard
    assert not (root / "export_chat" / "corrupt.parquet").exists()
    report = json.loads((root / "dataset_report" / "report.json").read_text())
    assert report["pairs"] > 0


def test_empty_shards_have_the_same_typed_schema_as_full_ones(bad_run):
    _, root, _ = bad_run
    for table in ("documents", "matches", "instantiations", "judgements", "fineinstructions"):
        full = pl.read_parquet_schema(root / table / "faq.parquet")
        for shard in ("empty", "blank"):
            path = root / table / f"{shard}.parquet"
            assert pl.read_parquet(path).height == 0
            assert pl.read_parquet_schema(path) == full, f"{table}[{shard}]"


def test_a_row_twice_in_a_file_is_an_exact_duplicate_with_a_reason(bad_run):
    _, root, _ = bad_run
    removed = pl.read_parquet(root / "quarantine" / "documents" / "dups.parquet")
    assert removed["reason"].to_list() == ["exact_duplicate"]
    kept = pl.read_parquet(root / "documents" / "dups.parquet")
    assert removed["duplicate_of"][0] in kept["doc_id"].to_list()  # the first copy stays


def test_the_unsupported_file_is_listed_in_the_run_metadata(bad_run):
    _, _, home = bad_run
    with DagsterInstance.from_config(str(home)) as instance:
        rec = instance.fetch_materializations(
            AssetRecordsFilter(asset_key=AssetKey("filtered_documents"), asset_partitions=["faq"]), limit=1).records[0]
        meta = rec.asset_materialization.metadata
        assert meta["skipped_input_files"].value == 1
        assert "notes.csv" in meta["skipped_inputs"].value


def test_a_batched_run_records_the_partitions_that_succeeded(tmp_path, sample_inputs, monkeypatch):
    from fineinstructions_dagster.defs.decontamination.assets import benchmark_ngrams
    from fineinstructions_dagster.defs.queries.assets import user_queries
    from fineinstructions_dagster.defs.resources import build_resources

    queries = tmp_path / "queries"
    shutil.copytree(sample_inputs / "queries", queries)
    (queries / "broken.parquet").write_bytes(b"not parquet")
    monkeypatch.setenv("FINEINSTRUCTIONS_ROOT", str(tmp_path / "root"))
    monkeypatch.setenv("FINEINSTRUCTIONS_QUERIES", str(queries))
    with DagsterInstance.ephemeral() as instance:
        assert materialize([benchmark_ngrams], instance=instance, resources=build_resources()).success
        instance.add_dynamic_partitions("query_source", ["broken", "python_faq"])
        result = materialize([user_queries], instance=instance, resources=build_resources(), raise_on_error=False,
                             tags={"dagster/asset_partition_range_start": "broken",
                                   "dagster/asset_partition_range_end": "python_faq"})
        assert not result.success
        done = {r.partition_key for r in instance.fetch_materializations(
            AssetRecordsFilter(asset_key=AssetKey("user_queries")), limit=10).records}
        assert done == {"python_faq"}
        check = instance.event_log_storage.get_latest_asset_check_execution_by_key(
            [AssetCheckKey(AssetKey("user_queries"), "query_id_unique")])
        evaluation = next(iter(check.values())).event.asset_check_evaluation
        assert evaluation.passed and evaluation.partition == "python_faq"
    assert Path(tmp_path / "root" / "user_queries" / "python_faq.parquet").exists()
