import polars as pl
import pytest

from fineinstructions_dagster.config import DocumentFilterConfig
from fineinstructions_dagster.stages.documents import filter_documents

CFG = DocumentFilterConfig(min_words=5, max_words=60)
GOOD = "The quick brown fox jumps over the lazy dog near the quiet river bank today."


def run(texts):
    raw = pl.DataFrame({"source_file": "s.parquet", "source_row": list(range(len(texts))),
                        "source_id": [str(i) for i in range(len(texts))], "text": texts,
                        "url": [f"http://x/{i}" for i in range(len(texts))], "metadata": "{}"})
    return filter_documents(raw, "shard1", CFG, run_id="r1")


@pytest.mark.parametrize("text,reason", [
    ("", "empty"),
    ("only three words", "too_short"),
    ("word " * 61, "too_long"),
    ("a b c d e f g h i j", "short_words"),
    ("extraordinarilylongword " * 6, "long_words"),
    ("1234 5678 9012 3456 7890 1122 3344 apple pear", "few_alpha_words"),
    ("#heading #more #hash #marks everywhere in this #text", "symbol_heavy"),
])
def test_each_filter_reason(text, reason):
    kept, rejected, stats = run([text])
    assert kept.height == 0
    assert rejected["reason"].to_list() == [reason]
    assert stats.dropped[reason] == 1


def test_exact_duplicate_within_shard_records_what_it_duplicates():
    kept, rejected, stats = run([GOOD, GOOD.upper().replace(" ", "  "), GOOD + " Extra words here."])
    assert kept.height == 2
    assert rejected["reason"].to_list() == ["exact_duplicate"]
    assert rejected["duplicate_of"].to_list() == ["source_row 0"]
    assert kept["doc_id"].is_unique().all() and stats.kept == 2


def test_empty_shard_gives_empty_output():
    raw = pl.DataFrame(schema={"source_file": pl.String, "source_row": pl.Int64, "source_id": pl.String,
                               "text": pl.String, "url": pl.String, "metadata": pl.String})
    kept, rejected, stats = filter_documents(raw, "empty", CFG)
    assert kept.height == 0 and rejected.height == 0 and stats.total == 0
