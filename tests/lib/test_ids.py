import polars as pl

from fineinstructions_dagster.lib.ids import content_id, content_id_expr


def test_content_id_is_stable_and_namespaced():
    assert content_id("doc", "a", 1) == content_id("doc", "a", 1)
    assert content_id("doc", "a", 1) != content_id("doc", "a", 2)
    assert content_id("doc", "x").startswith("d") and content_id("query", "x").startswith("q")
    assert content_id("doc", "x")[1:] != content_id("query", "x")[1:]


def test_vectorised_ids_are_deterministic_and_distinct():
    df = pl.DataFrame({"a": ["x", "x", "y", None], "b": ["1", "2", "1", "1"]})
    ids = df.select(content_id_expr("pair", "a", "b")).to_series()
    again = df.select(content_id_expr("pair", "a", "b")).to_series()
    assert ids.to_list() == again.to_list()
    assert ids.n_unique() == 4
    assert all(i.startswith("p") and len(i) == 17 for i in ids)
