import polars as pl
import pytest

from fineinstructions_dagster.stages.embedding import get_embedder
from fineinstructions_dagster.stages.matching import (
    StaleIndexError,
    build_template_index,
    match_documents,
    open_template_index,
)

BANK = pl.DataFrame({
    "template_id": ["t1", "t2", "t3"],
    "compatible_document_description": [
        "A tutorial about sorting lists and sequences in Python.",
        "A recipe for baking sourdough bread at home.",
        "An article about network sockets and TCP connections.",
    ],
})
DOCS = pl.DataFrame({
    "doc_id": ["d1", "d2"], "shard": "s",
    "text": ["The list.sort() method sorts a list in place; sorted() returns a new sorted list.",
             "A socket is an endpoint for sending and receiving data across a TCP network connection."],
})


@pytest.fixture(scope="module")
def embedder():
    return get_embedder()


def test_index_round_trip_and_retrieval(tmp_path, embedder):
    meta = build_template_index(BANK, embedder, tmp_path)
    assert meta.n_templates == 3 and meta.dim == embedder.dim
    tindex = open_template_index(tmp_path, embedder, BANK)
    found, stats = match_documents(DOCS, tindex, embedder, k=2, run_id="r")
    top = found.filter(pl.col("rank") == 1).sort("doc_id")["template_id"].to_list()
    assert top == ["t1", "t3"]
    assert found.height == 4 and stats.kept == 2
    again, _ = match_documents(DOCS, open_template_index(tmp_path, embedder, BANK), embedder, k=2, run_id="r")
    assert found.equals(again)  # re-running a shard reproduces its matches exactly


def test_stale_index_is_detected(tmp_path, embedder):
    build_template_index(BANK, embedder, tmp_path)
    changed = BANK.with_columns(pl.lit("something else").alias("compatible_document_description"))
    with pytest.raises(StaleIndexError, match="template bank changed"):
        open_template_index(tmp_path, embedder, changed)


def test_empty_bank_is_a_clear_error(tmp_path, embedder):
    with pytest.raises(ValueError, match="empty template bank"):
        build_template_index(BANK.clear(), embedder, tmp_path)


def test_min_score_drop_is_counted(tmp_path, embedder):
    build_template_index(BANK, embedder, tmp_path)
    found, stats = match_documents(DOCS, open_template_index(tmp_path, embedder), embedder, k=2, min_score=0.99)
    assert found.height == 0 and stats.dropped["no_template_above_min_score"] == 2
