"""The whole asset graph, materialized in-process on a small real-text sample with the smoke model
(transformers backend), then every final pair's lineage traced back to a real document and query."""

from __future__ import annotations

import json

import polars as pl
import pytest
from dagster import DagsterInstance, load_assets_from_modules, materialize

from fineinstructions_dagster.cli import main as cli
from fineinstructions_dagster.lib.storage import TableStore
from fineinstructions_dagster.runner import SHARD_STEP, run_pipeline
from fineinstructions_dagster.stages.lineage import LINEAGE_KEYS, trace_pair


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory, smoke_model, sample_inputs):
    root = tmp_path_factory.mktemp("root")
    env = {
        "FINEINSTRUCTIONS_ROOT": str(root), "FINEINSTRUCTIONS_QUERIES": str(sample_inputs / "queries"),
        "FINEINSTRUCTIONS_CORPUS": str(sample_inputs / "corpus"), "FINEINSTRUCTIONS_PROFILE": "demo",
        "FINEINSTRUCTIONS_SMOKE_MODEL": str(smoke_model), "FINEINSTRUCTIONS_LLM_BACKEND": "transformers",
    }
    mp = pytest.MonkeyPatch()
    for k, v in env.items():
        mp.setenv(k, v)
    instance = DagsterInstance.ephemeral()
    run = run_pipeline(instance, log=lambda _: None)
    yield TableStore(root), instance, run
    mp.undo()


def test_every_stage_materialized_and_final_table_nonempty(pipeline):
    store, _, run = pipeline
    assert run.sources == ["python_faq"] and run.shards == ["faq", "tutorial"]
    pairs = pl.read_parquet(store.glob("fineinstructions"))
    assert pairs.height > 0 and pairs["pair_id"].is_unique().all()
    report = json.loads((store.root / "dataset_report" / "report.json").read_text())
    assert report["pairs"] == pairs.height and report["profile"] == "demo"
    chat = pl.read_parquet(store.glob("export_chat"))
    assert sorted(chat["pair_id"]) == sorted(pairs["pair_id"])  # every final pair exported once
    packed = pl.read_parquet(store.glob("export_packed"))
    assert sorted(packed["pair_ids"].explode()) == sorted(pairs["pair_id"])
    assert (packed["answer_tokens"] > 0).all()


def test_every_pair_traces_to_a_real_document_and_query(pipeline, sample_inputs):
    store, _, _ = pipeline
    faq = {json.loads(line)["text"] for line in (sample_inputs / "queries" / "python_faq.jsonl").open()}
    corpus = pl.concat([pl.read_parquet(sample_inputs / "corpus" / "tutorial.parquet").select("text", "url"),
                        pl.read_ndjson(sample_inputs / "corpus" / "faq.jsonl").select("text", "url")])
    source_docs = dict(zip(corpus["url"], corpus["text"], strict=True))
    for pair_id in pl.read_parquet(store.glob("fineinstructions"))["pair_id"]:
        chain = trace_pair(store, pair_id)
        assert set(LINEAGE_KEYS) <= set(chain)
        assert chain["query"]["text"] in faq
        assert chain["query"]["query_id"] in chain["template"]["query_ids"]
        assert chain["document"]["text"] == source_docs[chain["document"]["url"]].strip()
        assert chain["instantiation"]["match_id"] == chain["match"]["match_id"]
        assert chain["instantiation"]["raw_output"] and chain["instantiation"]["prompt"]
        assert all(chain["runs"].values())


def test_rerunning_a_shard_reproduces_it_exactly_from_the_cache(pipeline):
    store, instance, _ = pipeline
    before = {t: store.read(t, "faq") for t in ("matches", "instantiations", "judgements", "fineinstructions")}
    from fineinstructions_dagster.definitions import STAGE_MODULES
    from fineinstructions_dagster.defs.resources import build_resources

    result = materialize(load_assets_from_modules(STAGE_MODULES), selection=SHARD_STEP, partition_key="faq",
                         instance=instance, resources=build_resources())
    mats = {e.asset_key.to_user_string(): e.step_materialization_data.materialization.metadata
            for e in result.get_asset_materialization_events()}
    for stage in ("instantiations", "judgements"):
        assert mats[stage]["engine_requests"].value == 0  # every generation served from the cache
        assert mats[stage]["cache_hits"].value == mats[stage]["total"].value
    for table, df in before.items():
        ids = [c for c in df.columns if c.endswith("_id") and c != "run_id" and not c.endswith("run_id")]
        assert store.read(table, "faq").select(ids).equals(df.select(ids)), table


def test_lineage_cli_json_has_the_documented_keys(pipeline, capsys):
    store, _, _ = pipeline
    pair_id = pl.read_parquet(store.glob("fineinstructions"))["pair_id"][0]
    assert cli(["--root", str(store.root), "lineage", "--json", pair_id]) == 0
    chain = json.loads(capsys.readouterr().out)
    assert list(chain) == ["pair", "judgement", "instantiation", "match", "template", "query", "document", "runs"]
    assert cli(["--root", str(store.root), "lineage", "p0000000000000000"]) == 2
    assert "not found" in capsys.readouterr().err
