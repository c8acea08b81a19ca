import polars as pl
import pytest

from fineinstructions_dagster.defs.metadata import preview_markdown, require_all_joined, stage_metadata
from fineinstructions_dagster.lib.stats import StageStats


def test_stage_metadata_uses_one_vocabulary():
    stats = StageStats(total=5, kept=3)
    stats.drop("too_short", 2)
    meta = stage_metadata(stats, pl.DataFrame({"text": ["a | b", "x" * 200]}), ["text"], row_count=7)
    assert meta["dagster/row_count"] == 7
    assert meta["total"].value == 5 and meta["kept"].value == 3 and meta["dropped_too_short"].value == 2
    md = meta["preview"].value
    assert "a \\| b" in md and "…" in md


def test_preview_of_empty_table():
    assert preview_markdown(pl.DataFrame({"a": []}), ["a"]) == "_(no rows)_"


def test_join_that_loses_rows_is_an_error_not_a_silent_drop():
    left = pl.DataFrame({"doc_id": ["d1", "d2"]})
    docs = pl.DataFrame({"doc_id": ["d1"], "text": ["t"]})
    with pytest.raises(ValueError, match="1 of 2 rows reference ids missing upstream"):
        require_all_joined(left, left.join(docs, on="doc_id"), "matches -> documents")
