"""Turn stage statistics and previews into asset metadata the same way in every stage."""

from __future__ import annotations

from typing import Any

import polars as pl
from dagster import MetadataValue

from fineinstructions_dagster.lib.stats import StageStats


def preview_markdown(df: pl.DataFrame, columns: list[str], rows: int = 5, width: int = 80) -> str:
    if df.height == 0:
        return "_(no rows)_"
    cols = [c for c in columns if c in df.columns]
    head = df.head(rows).select(cols)
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for row in head.iter_rows():
        cells = []
        for v in row:
            s = " ".join(str(v).split()).replace("|", "\\|")
            cells.append(s if len(s) <= width else s[: width - 1] + "…")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def stage_metadata(stats: StageStats, preview: pl.DataFrame | None = None, columns: list[str] | None = None,
                   row_count: int | None = None, **extra: Any) -> dict[str, Any]:
    """`row_count`: rows written, where it differs from the kept inputs (e.g. k matches per document)."""
    meta: dict[str, Any] = {"dagster/row_count": stats.kept if row_count is None else row_count}
    meta.update({k: MetadataValue.int(v) if isinstance(v, int) else MetadataValue.float(float(v))
                 for k, v in stats.as_dict().items()})
    if preview is not None:
        meta["preview"] = MetadataValue.md(preview_markdown(preview, columns or list(preview.columns)))
    for k, v in extra.items():
        meta[k] = MetadataValue.md(v) if isinstance(v, str) and "\n" in v else v
    return meta


def require_all_joined(left: pl.DataFrame, joined: pl.DataFrame, what: str) -> pl.DataFrame:
    """An inner join that must keep every row: upstream tables out of step are an error, not a drop."""
    if joined.height != left.height:
        raise ValueError(
            f"{what}: {left.height - joined.height} of {left.height} rows reference ids missing upstream; "
            "the upstream partitions changed since this one's inputs were built: re-materialize them in order"
        )
    return joined
