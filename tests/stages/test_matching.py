import numpy as np
import polars as pl
import pytest

from fineinstructions_dagster.stages.embedding import get_embedder
from fineinstructions_dagster.stages.matching import (
    IndexConfig,
    MatchConfig,
    StaleIndexError,
    build_template_index,
    match_documents,
    open_template_index,
    read_index_meta,
    template_index_id,
    template_usage,
    unchanged_template_index,
    unmatched_documents,
)

BANK = pl.DataFrame({
    "template_id": ["t1", "t2", "t3", "t4"],
    "compatible_document_description": [
        "A tutorial about sorting lists and sequences in Python.",
        "A recipe for baking sourdough bread at home.",
        "An article about network sockets and TCP connections.",
        "A guide to sorting a list in Python.",  # near-duplicate of t1
    ],
})
DOCS = pl.DataFrame({
    "doc_id": ["d1", "d2"], "shard": "s",
    "text": ["The list.sort() method sorts a list in place; sorted() returns a new sorted list.",
             "A socket is an endpoint for sending and receiving data across a TCP network connection."],
})
PLAIN = MatchConfig(k=2, hubness=0.0, diversity=0.0)


@pytest.fixture(scope="module")
def embedder():
    return get_embedder()


@pytest.fixture
def index_dir(tmp_path, embedder):
    build_template_index(BANK, embedder, tmp_path)
    return tmp_path


def test_index_save_view_reload_and_retrieval(index_dir, embedder):
    meta = read_index_meta(index_dir)
    assert (meta.n_templates, meta.dim, meta.dtype, meta.build) == (4, embedder.dim, "f16", "full")
    assert meta.embedder_revision == embedder.revision
    tindex = open_template_index(index_dir, embedder, BANK)
    with pytest.raises(Exception, match="immutable"):  # opened as a memory-mapped view, not loaded
        tindex.index.add(np.array([99], dtype=np.uint64), np.ones((1, embedder.dim), dtype=np.float32))
    assert len(tindex.index) == 4 and sorted(tindex.template_ids) == ["t1", "t2", "t3", "t4"]
    found, stats = match_documents(DOCS, tindex, embedder, PLAIN, run_id="r")
    top = found.filter(pl.col("rank") == 1).sort("doc_id")["template_id"].to_list()
    assert top[0] in ("t1", "t4") and top[1] == "t3"
    assert found.height == 4 and stats.kept == 2 and stats.extra["matches"] == 4
    assert set(found.columns) >= {"match_id", "chunk", "chunk_position", "score", "rank", "index_id", "pooling"}


def test_matches_for_a_shard_are_identical_when_re_run(index_dir, embedder):
    cfg = MatchConfig(k=3)
    first, _ = match_documents(DOCS, open_template_index(index_dir, embedder, BANK), embedder, cfg, run_id="r")
    shuffled = DOCS.reverse()  # row order of the shard does not matter either
    again, _ = match_documents(shuffled, open_template_index(index_dir, embedder, BANK), embedder, cfg, run_id="r")
    assert first.equals(again)
    assert first["match_id"].n_unique() == first.height


@pytest.mark.parametrize("dtype", ["f32", "f16", "i8"])
def test_index_dtypes_and_settings_round_trip(tmp_path, embedder, dtype):
    cfg = IndexConfig(dtype=dtype, connectivity=8, expansion_add=40, expansion_search=20)
    build_template_index(BANK, embedder, tmp_path, cfg)
    tindex = open_template_index(tmp_path, embedder, BANK)
    assert tindex.meta.config() == cfg and tindex.index.expansion_search == 20
    found, _ = match_documents(DOCS, tindex, embedder, PLAIN)
    assert found.filter(pl.col("doc_id") == "d2", pl.col("rank") == 1)["template_id"].item() == "t3"


def test_stale_index_is_detected(index_dir, embedder):
    changed = BANK.with_columns(pl.lit("something else").alias("compatible_document_description"))
    with pytest.raises(StaleIndexError, match="template bank changed"):
        open_template_index(index_dir, embedder, changed)
    meta = index_dir / "meta.json"
    meta.write_text(meta.read_text().replace(embedder.revision, "0ld0ld0ld0ld"))
    with pytest.raises(StaleIndexError, match="built with embedder"):
        open_template_index(index_dir, embedder, BANK)


def test_missing_index_is_a_clear_error(tmp_path, embedder):
    with pytest.raises(FileNotFoundError, match="materialize template_index"):
        open_template_index(tmp_path / "nothing", embedder)


def test_empty_bank_is_a_clear_error(tmp_path, embedder):
    with pytest.raises(ValueError, match="empty template bank"):
        build_template_index(BANK.clear(), embedder, tmp_path)


def test_incremental_update_adds_and_removes_only_what_changed(index_dir, tmp_path, embedder):
    grown = pl.concat([BANK.filter(pl.col("template_id") != "t2"), pl.DataFrame({
        "template_id": ["t5"], "compatible_document_description": ["A guide to brewing coffee."]})])
    out = tmp_path / "next"
    out.mkdir()
    meta = build_template_index(grown, embedder, out, previous=index_dir)
    assert (meta.build, meta.added, meta.removed, meta.n_templates) == ("incremental", 1, 1, 4)
    assert meta.parent_index_id == read_index_meta(index_dir).index_id
    tindex = open_template_index(out, embedder, grown)
    assert sorted(tindex.template_ids) == ["t1", "t3", "t4", "t5"]
    coffee = pl.DataFrame({"doc_id": ["d3"], "shard": "s", "text": ["Brewing coffee with a French press."]})
    found, _ = match_documents(coffee, tindex, embedder, PLAIN)
    assert found.filter(pl.col("rank") == 1)["template_id"].item() == "t5"
    # another index setting cannot be updated in place: a full build
    other = tmp_path / "other"
    other.mkdir()
    assert build_template_index(grown, embedder, other, IndexConfig(dtype="i8"), previous=index_dir).build == "full"


def test_a_rebuild_with_nothing_changed_is_unchanged_and_never_its_own_parent(index_dir, tmp_path, embedder):
    first = read_index_meta(index_dir)
    assert first.index_id == template_index_id(BANK, embedder) and first.parent_index_id == ""
    same = unchanged_template_index(index_dir, template_index_id(BANK.reverse(), embedder))  # order is not content
    assert (same.build, same.added, same.removed, same.index_id, same.parent_index_id) == (
        "unchanged", 0, 0, first.index_id, "")
    assert unchanged_template_index(index_dir, template_index_id(BANK.head(3), embedder)) is None
    assert unchanged_template_index(tmp_path / "nothing", first.index_id) is None
    # rebuilt anyway: the same id, and the parent stays the previous one's, not itself
    out = tmp_path / "again"
    out.mkdir()
    again = build_template_index(BANK, embedder, out, previous=index_dir)
    assert (again.build, again.added, again.removed, again.index_id) == ("incremental", 0, 0, first.index_id)
    assert again.parent_index_id == first.parent_index_id != again.index_id
    (index_dir / "templates.usearch").unlink()  # a damaged index is rebuilt, not reported unchanged
    assert unchanged_template_index(index_dir, first.index_id) is None


def test_document_shorter_than_n_tokens_and_empty_text(index_dir, embedder):
    docs = pl.DataFrame({"doc_id": ["a", "b"], "shard": "s", "text": ["sockets", ""]})
    found, stats = match_documents(docs, open_template_index(index_dir, embedder), embedder, PLAIN)
    assert stats.total == 2 and found.filter(pl.col("doc_id") == "a", pl.col("rank") == 1)["template_id"].item() == "t3"


def test_min_score_drop_is_counted(index_dir, embedder):
    cfg = MatchConfig(k=2, min_score=0.99)
    found, stats = match_documents(DOCS, open_template_index(index_dir, embedder), embedder, cfg)
    assert found.height == 0 and stats.dropped["no_template_above_min_score"] == 2
    quarantined = unmatched_documents(DOCS, found)  # and each such document is a quarantine row with the reason
    assert sorted(quarantined["doc_id"]) == sorted(DOCS["doc_id"])
    assert set(quarantined["reason"]) == {"no_template_above_min_score"}


def test_diversity_avoids_near_identical_templates(index_dir, embedder):
    tindex = open_template_index(index_dir, embedder)
    sorting = DOCS.filter(pl.col("doc_id") == "d1")
    plain, _ = match_documents(sorting, tindex, embedder, PLAIN)
    assert set(plain["template_id"]) == {"t1", "t4"}  # by score alone: both sorting templates
    diverse, _ = match_documents(sorting, tindex, embedder, MatchConfig(k=2, hubness=0.0, diversity=1.0))
    assert len(set(diverse["template_id"]) & {"t1", "t4"}) == 1
    assert diverse["rank"].to_list() == [1, 2]


def test_hubness_correction_spreads_template_use(tmp_path, embedder):
    bank = pl.DataFrame({"template_id": [f"t{i}" for i in range(6)], "compatible_document_description": [
        "A document about Python programming.",  # generic: close to every doc below
        "How to sort lists with sorted().", "How to open and read files.", "How to format strings with f-strings.",
        "How to use dictionaries to count items.", "How to write a class with methods."]})
    build_template_index(bank, embedder, tmp_path)
    tindex = open_template_index(tmp_path, embedder)
    docs = pl.DataFrame({"doc_id": [f"d{i}" for i in range(5)], "shard": "s", "text": [
        "Python code: sorted(items) returns a new sorted list of the items.",
        "Python code: open('data.txt') returns a file object; read() gives its text.",
        "Python code: f'{name}!' formats the name into a string.",
        "Python code: counts = {} then counts[word] = counts.get(word, 0) + 1.",
        "Python code: class Dog: def bark(self): print('woof').",
    ]})
    plain, _ = match_documents(docs, tindex, embedder, MatchConfig(k=1, hubness=0.0, diversity=0.0))
    csls, stats = match_documents(docs, tindex, embedder, MatchConfig(k=1, hubness=0.5, diversity=0.0))
    usage_plain, usage = template_usage(plain), template_usage(csls)
    assert usage["uses"].max() <= usage_plain["uses"].max()
    assert usage.height >= 4 and stats.extra["distinct_templates"] == usage.height
    assert stats.extra["top_template_share"] == pytest.approx(float(usage["share"][0]), abs=1e-4)


def test_coverage_chunks_find_a_template_for_a_late_section(index_dir, embedder):
    filler = "Sorting lists with sorted() and list.sort() in Python is easy. " * 50
    doc = pl.DataFrame({"doc_id": ["long"], "shard": "s",
                        "text": [filler + "A socket is an endpoint of a TCP network connection. " * 5]})
    tindex = open_template_index(index_dir, embedder)
    mean, _ = match_documents(doc, tindex, embedder, MatchConfig(k=2, hubness=0, diversity=1.0,
                                                               pooling=MatchConfig().pooling.__class__("mean")))
    cov, _ = match_documents(doc, tindex, embedder, MatchConfig(k=2, hubness=0, diversity=1.0))
    sockets = cov.filter(pl.col("template_id") == "t3")
    assert sockets.height == 1 and sockets["chunk"].item() != "global"
    assert float(sockets["chunk_position"].item()) > 0.8  # the socket text is at the end
    assert "t3" not in mean["template_id"].to_list() or float(
        mean.filter(pl.col("template_id") == "t3")["score"].item()) < float(sockets["score"].item())
    assert np.all(cov["score"].to_numpy() <= 1.0001)


def test_match_invariants_check(index_dir, embedder):
    from fineinstructions_dagster.stages.matching import match_problems

    found, _ = match_documents(DOCS, open_template_index(index_dir, embedder), embedder, MatchConfig(k=3))
    assert match_problems(found, 3) == []
    broken = pl.concat([found, found.head(1)])
    assert {"ranks are not 1..n within a document", "a template matched twice to one document",
            "duplicate match ids"} <= set(match_problems(broken, 3))
    assert "documents with more than k=2 matches" in match_problems(found, 2)


def test_index_from_an_older_version_is_stale_and_rebuilt(index_dir, tmp_path, embedder):
    (index_dir / "meta.json").write_text('{"index_id": "i0", "embedder": "x", "dim": 384}')  # the old layout
    with pytest.raises(StaleIndexError, match="another version"):
        open_template_index(index_dir, embedder)
    out = tmp_path / "rebuilt"
    out.mkdir()
    assert build_template_index(BANK, embedder, out, previous=index_dir).build == "full"


def test_inner_product_metric_scores_like_cosine(tmp_path, embedder):
    build_template_index(BANK, embedder, tmp_path, IndexConfig(metric="ip"))
    found, stats = match_documents(DOCS, open_template_index(tmp_path, embedder), embedder, PLAIN)
    assert stats.kept == 2 and found["score"].min() > 0  # unit vectors: ip = cosine
    with pytest.raises(ValueError, match="metric"):
        IndexConfig(metric="l2sq")
