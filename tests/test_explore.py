"""`fineinstructions explore` over a real pipeline's root (smoke profile): one search opens any object's page,
the pair page shows the whole chain with links to the runs recorded on the pair, a document without pairs says
why, and the shard's materializations link to the explorer. (The browser test clicks through the same pages.)"""

from __future__ import annotations

import re

import polars as pl
import pytest
from dagster import AssetKey
from starlette.testclient import TestClient

from fineinstructions_dagster.explore.app import create_app
from fineinstructions_dagster.explore.lookups import highlight_quotes, split_slots

DAGSTER = "http://dagster.test:3000"


@pytest.fixture(scope="module")
def client(pipeline):
    store, _, _ = pipeline
    return TestClient(create_app(str(store.root), DAGSTER))


def test_one_search_opens_the_pair_page_with_its_whole_chain(pipeline, client):
    store, _, _ = pipeline
    pair = pl.read_parquet(store.glob("fineinstructions")).sort("pair_id").row(0, named=True)
    page = client.get("/search", params={"q": pair["pair_id"]})
    assert page.status_code == 200 and page.url.path == f"/pair/{pair['pair_id']}"
    html = page.text
    for section in ("pair", "query", "template", "match", "document", "instantiation", "judgement"):
        assert f'<section id="{section}">' in html, section
    for step_id in (pair["query_id"], pair["template_id"], pair["match_id"], pair["doc_id"],
                    pair["instantiation_id"], pair["judgement_id"]):
        assert step_id in html
    assert 'class="slot"' in html  # the template's slots
    # links to the runs recorded on the pair and to the shard's partitions in the Dagster UI
    for run in ("run_id", "instantiations_run_id", "judgements_run_id", "matches_run_id", "documents_run_id",
                "template_bank_run_id"):
        assert f'href="{DAGSTER}/runs/{pair[run]}"' in html, run
    assert f'href="{DAGSTER}/assets/fineinstructions?view=partitions&amp;partition={pair["shard"]}"' in html
    # a step's id finds its pair too; a url finds its document
    for step in ("instantiation_id", "judgement_id", "match_id"):
        assert client.get("/search", params={"q": pair[step]}).url.path == f"/pair/{pair['pair_id']}"
    assert client.get("/search", params={"q": pair["url"]}).url.path in (f"/document/{pair['doc_id']}", "/search")
    missing = client.get("/search", params={"q": "p0000000000000000"})
    assert missing.status_code == 404 and "nothing under this root" in missing.text
    # a shard key that is no file name is a shard that does not exist, not a path to read (nor a 500)
    for bad in ("..%2F..%2Fetc", "..%2F..%2Fetc%2Fpasswd", "faq%00", "a%20b"):
        unsafe = client.get(f"/shard/{bad}")
        assert unsafe.status_code == 404 and "no shard is named" in unsafe.text, bad


def test_document_pages_list_pairs_or_say_why_none(pipeline, client):
    store, _, _ = pipeline
    pair = pl.read_parquet(store.glob("fineinstructions")).sort("pair_id").row(0, named=True)
    page = client.get(f"/document/{pair['doc_id']}").text
    assert f'href="/pair/{pair["pair_id"]}"' in page
    filtered = pl.read_parquet(store.glob("filtered_documents", quarantine=True))
    assert filtered.height > 0  # the sample has documents too short for the filter
    row = filtered.row(0, named=True)
    page = client.get(f"/document/{row['doc_id']}")
    assert page.status_code == 200 and f"filtered out by the rule `{row['reason']}`" in page.text


def test_template_query_and_shard_pages(pipeline, client):
    store, _, _ = pipeline
    pair = pl.read_parquet(store.glob("fineinstructions")).sort("pair_id").row(0, named=True)
    template = client.get(f"/template/{pair['template_id']}").text
    assert f'href="/query/{pair["query_id"]}"' in template and f'href="/pair/{pair["pair_id"]}"' in template
    query = client.get(f"/query/{pair['query_id']}").text
    assert f'href="/template/{pair["template_id"]}"' in query
    shard = client.get(f"/shard/{pair['shard']}").text
    assert len(re.findall(r"<svg ", shard)) == 3 and "judge score" in shard and "grounding" in shard
    # the control pairs' figures, once, in the page (not in its <title>)
    assert shard.count('<section id="controls">') == 1 and "fills in answer AUC" in shard
    assert re.search(r"<title>shard [^<]*</title>", shard)


def test_shard_materializations_link_to_the_explorer(pipeline):
    _, instance, _ = pipeline
    for asset in ("fineinstructions", "documents"):
        record = instance.fetch_materializations(AssetKey(asset), limit=1).records[0]
        metadata = record.asset_materialization.metadata
        shard = record.partition_key
        assert metadata["explore"].url == f"http://127.0.0.1:8080/shard/{shard}", asset
    preview = instance.fetch_materializations(AssetKey("fineinstructions"), limit=1).records[0] \
        .asset_materialization.metadata["preview"].md_str
    assert re.search(r"\[p[0-9a-f]{16}\]\(http://127\.0\.0\.1:8080/pair/p[0-9a-f]{16}\)", preview)


def test_highlights():
    assert split_slots("How do I sort <fi>a container</fi> fast?") == [
        ("How do I sort ", False), ("a container", True), (" fast?", False)]
    doc = "Lists are mutable. The sort method sorts the list in place. Tuples are not."
    parts = highlight_quotes(doc, "It says: the sort method sorts the list, quickly.")
    assert [t for t, on in parts if on] == ["The sort method sorts the list"]
    assert "".join(t for t, _ in parts) == doc
