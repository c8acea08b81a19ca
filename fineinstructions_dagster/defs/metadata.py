"""Turn stage statistics and previews into asset metadata the same way in every stage."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any
from urllib.parse import quote

import polars as pl
from dagster import (
    AssetCheckEvaluation,
    AssetCheckResult,
    AssetMaterialization,
    Failure,
    MaterializeResult,
    MetadataValue,
)

from fineinstructions_dagster.lib.chunks import ChunkedRun, Progress, progress_bar
from fineinstructions_dagster.lib.stats import StageStats


def preview_markdown(df: pl.DataFrame, columns: list[str], rows: int = 5, width: int = 80,
                     links: dict[str, str] | None = None) -> str:
    """A Markdown table of the first rows; `links`: column -> URL prefix, for ids that link to their page (the
    explorer's)."""
    if df.height == 0:
        return "_(no rows)_"
    cols = [c for c in columns if c in df.columns]
    head = df.head(rows).select(cols)
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for row in head.iter_rows():
        cells = []
        for col, v in zip(cols, row, strict=True):
            s = " ".join(str(v).split()).replace("|", "\\|")
            if links and col in links and v is not None and s.isalnum():  # ids only: nothing to escape
                cells.append(f"[{s}]({links[col]}{s})")
                continue
            cells.append(s if len(s) <= width else s[: width - 1] + "…")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def stage_metadata(stats: StageStats, preview: pl.DataFrame | None = None, columns: list[str] | None = None,
                   row_count: int | None = None, preview_rows: int = 5, links: dict[str, str] | None = None,
                   **extra: Any) -> dict[str, Any]:
    """`row_count`: rows written, where it differs from the kept inputs (e.g. k matches per document)."""
    meta: dict[str, Any] = {"dagster/row_count": stats.kept if row_count is None else row_count}
    meta.update({k: MetadataValue.int(v) if isinstance(v, int) else MetadataValue.float(float(v))
                 for k, v in stats.as_dict().items()})
    if preview is not None:
        meta["preview"] = MetadataValue.md(preview_markdown(preview, columns or list(preview.columns), preview_rows,
                                                            links=links))
    for k, v in extra.items():
        meta[k] = MetadataValue.md(v) if isinstance(v, str) and "\n" in v else v
    return meta


def explore_links(shard: str) -> tuple[dict[str, Any], dict[str, str]]:
    """The shard page's URL in the explorer (metadata) and the link prefixes for ids in a preview."""
    from fineinstructions_dagster.defs.resources import setting

    base = setting("FINEINSTRUCTIONS_EXPLORE_URL").rstrip("/")
    return ({"explore": MetadataValue.url(f"{base}/shard/{quote(shard)}")},
            {"pair_id": f"{base}/pair/", "doc_id": f"{base}/document/", "template_id": f"{base}/template/"})


def progress_reporter(context: Any) -> Callable[[Progress], None]:
    """Each chunk's progress as a run-log line; also as a bar on the terminal when the command-line runner
    asked for it (FINEINSTRUCTIONS_PROGRESS=1)."""
    bar = os.environ.get("FINEINSTRUCTIONS_PROGRESS") == "1"

    def report(p: Progress) -> None:
        context.log.info(p.line())
        if bar:
            progress_bar(p)

    return report


def throughput_metadata(run: ChunkedRun) -> dict[str, Any]:
    """What a materialization cost, so a backfill's cost can be read in the UI and projected to a corpus."""
    seconds = max(run.seconds, 1e-9)
    extra = run.stats.extra
    out: dict[str, Any] = {"seconds": round(run.seconds, 3), "rows_per_s": round(run.rows_processed / seconds, 2),
                           "chunks": run.chunks, "chunks_resumed": run.chunks_resumed}
    if "engine_seconds" in extra:
        out.update(engine_seconds=float(extra["engine_seconds"]),
                   requests_per_s=round(float(extra.get("engine_requests", 0)) / seconds, 2),
                   prompt_tokens_per_s=round(float(extra.get("prompt_tokens", 0)) / seconds, 1),
                   output_tokens_per_s=round(float(extra.get("completion_tokens", 0)) / seconds, 1))
    return out


def control_metadata(figures: dict[str, Any]) -> dict[str, Any]:
    """The control pairs' figures (stages/controls.control_figures) as flat metadata: counts and kept shares per
    kind, and each signal's AUC of real pair over control (1.0: it always ranks the real pair higher; 0.5: chance)."""
    out: dict[str, Any] = {}
    for key, value in figures.items():
        if isinstance(value, dict):
            out.update({f"{key}_{k}": v for k, v in value.items() if v is not None})
        elif value is not None:
            out[f"control_{key}" if not key.startswith(("control", "true", "kept")) else key] = value
    return out


def require_all_joined(left: pl.DataFrame, joined: pl.DataFrame, what: str) -> pl.DataFrame:
    """An inner join that must keep every row: upstream tables out of step are an error, not a drop."""
    if joined.height != left.height:
        raise ValueError(
            f"{what}: {left.height - joined.height} of {left.height} rows reference ids missing upstream; "
            "the upstream partitions changed since this one's inputs were built: re-materialize them in order"
        )
    return joined


def for_each_partition(context: Any, one: Callable[[str], Any]) -> Any:
    """Run `one(partition)` for every partition of the run (a backfill batches several per run so a model
    loads once). `one` returns a MaterializeResult, or a list of them (each with its asset_key) for a multi-asset;
    the same comes back. One partition: its result(s) as is. Several: each partition's own metadata (counts, drop
    reasons, preview) is attached to that partition's materialization, and a check passes only if it passed for
    every partition (the failing ones are named). A partition that raises does not take the others with it: the
    ones that succeeded are recorded as materialized, and the step then fails naming the others."""
    keys = list(context.partition_keys)
    if len(keys) == 1:
        return one(keys[0])
    multi = False
    checks: dict[tuple[Any, str], tuple[bool, list[str], Any]] = {}
    results: dict[str, list[MaterializeResult]] = {}
    errors: dict[str, str] = {}
    for key in keys:
        try:
            res = one(key)
        except Exception as e:  # one bad partition (bad input, missing upstream) must not fail its batch-mates
            errors[key] = f"{type(e).__name__}: {e}"
            context.log.error(f"partition {key} failed: {errors[key]}")
            continue
        multi = isinstance(res, list)
        results[key] = res if multi else [res]
        for r in results[key]:
            for check in r.check_results or []:
                passed, failed, severity = checks.get((r.asset_key, check.check_name), (True, [], check.severity))
                if not check.passed:
                    failed.append(key)
                checks[(r.asset_key, check.check_name)] = (passed and check.passed, failed, severity)
    if errors:
        for key, rs in results.items():
            for res in rs:
                asset_key = res.asset_key or context.asset_key
                context.log_event(AssetMaterialization(asset_key=asset_key, partition=key,
                                                       metadata=dict(res.metadata or {})))
                for check in res.check_results or []:  # the good partitions' checks count too
                    context.log_event(AssetCheckEvaluation(
                        asset_key=check.asset_key or asset_key, check_name=check.check_name or "",
                        passed=check.passed, metadata=dict(check.metadata or {}), partition=key,
                        severity=check.severity))
        raise Failure(
            f"{len(errors)} of {len(keys)} partitions failed (the other {len(results)} are recorded as "
            "materialized): " + "; ".join(f"{k}: {v}" for k, v in errors.items())[:4000],
            metadata={"failed_partitions": ", ".join(errors), "materialized_partitions": ", ".join(results)})
    asset_keys: list[Any] = []
    for key, rs in results.items():
        for res in rs:
            if res.asset_key not in asset_keys:
                asset_keys.append(res.asset_key)
            context.add_asset_metadata(dict(res.metadata or {}), partition_key=key,
                                       **({"asset_key": res.asset_key} if multi else {}))
    out = [MaterializeResult(
        asset_key=asset_key if multi else None, metadata={"partitions_in_run": len(keys)},
        check_results=[AssetCheckResult(check_name=name, passed=ok, severity=severity,
                                        metadata={"failed_partitions": ", ".join(failed) or "none"})
                       for (owner, name), (ok, failed, severity) in checks.items() if owner == asset_key])
        for asset_key in asset_keys]
    return out if multi else out[0]
