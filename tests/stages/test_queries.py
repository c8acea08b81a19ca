import polars as pl
import pytest

from fineinstructions_dagster.config import QueryFilterConfig
from fineinstructions_dagster.stages.queries import clean_queries

CFG = QueryFilterConfig(min_chars=10, max_chars=80, min_words=3, blocklist=("forbidden topic",))


def run(texts):
    raw = pl.DataFrame({"source_file": "f.jsonl", "source_row": list(range(len(texts))), "source_id": None,
                        "text": texts, "url": None, "metadata": "{}"},
                       schema_overrides={"source_id": pl.String, "url": pl.String})
    return clean_queries(raw, "src", CFG, run_id="r1")


@pytest.mark.parametrize("text,reason", [
    ("   ", "empty"),
    ("too short", "too_short"),
    ("twowords onlyhere", "too_few_words"),
    ("how " * 30, "too_long"),
    ("tell me about the Forbidden   Topic please", "blocklisted"),
])
def test_each_rejection_reason(text, reason):
    kept, rejected, stats = run([text])
    assert kept.height == 0
    assert rejected["reason"].to_list() == [reason]
    assert stats.as_dict()[f"dropped_{reason}"] == 1


def test_exact_duplicates_after_normalisation_are_dropped_and_ids_stable():
    texts = ["How do I sort a list in Python?", "how do i  sort a list in python", "What is a tuple used for?"]
    kept, rejected, stats = run(texts)
    assert kept["text"].to_list() == ["How do I sort a list in Python?", "What is a tuple used for?"]
    assert rejected["reason"].to_list() == ["duplicate"]
    assert stats.total == 3 and stats.kept == 2
    again, _, _ = run(texts)
    assert kept["query_id"].to_list() == again["query_id"].to_list()
    assert kept["run_id"].to_list() == ["r1", "r1"]


def test_same_query_twice_in_a_file_is_a_counted_duplicate():
    text = "How do I reverse a list in Python?"
    raw = pl.DataFrame({"source_file": "f.jsonl", "source_row": [1, 2], "source_id": ["q1", "q1"],
                        "text": [text, text], "url": None, "metadata": "{}"}, schema_overrides={"url": pl.String})
    kept, rejected, stats = clean_queries(raw, "src", CFG)
    assert kept.height == 1 and kept["source_row"].to_list() == [1]
    assert rejected.select("source_row", "reason").rows() == [(2, "duplicate")]
    assert stats.total == stats.kept + stats.dropped_total == 2
