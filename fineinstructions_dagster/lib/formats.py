"""Reading input files in the formats people have: Parquet and JSON Lines (optionally .gz), with
FineWeb / HF-datasets-style columns. Each source folder maps to partition keys by file name."""

from __future__ import annotations

import gzip
import io
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import polars as pl

SUFFIXES = (".parquet", ".jsonl", ".jsonl.gz", ".json", ".json.gz", ".ndjson")
TEXT_COLUMNS = ("text", "content", "raw_content", "query", "question", "instruction", "prompt")
ID_COLUMNS = ("id", "doc_id", "query_id", "warc_record_id", "uuid")
URL_COLUMNS = ("url", "source_url", "link")


class InputFormatError(ValueError):
    """An input file that cannot be read as a table of texts; the message names the file and problem."""


@dataclass
class ReadReport:
    rows: int = 0
    malformed_lines: list[tuple[str, int, str]] = field(default_factory=list)  # (file, line, error)


def malformed_frame(report: ReadReport) -> pl.DataFrame:
    """Malformed input lines as quarantine rows (file, line, reason)."""
    return pl.DataFrame(
        [{"source_file": f, "source_row": n, "reason": "malformed_json", "detail": e} for f, n, e in
         report.malformed_lines],
        schema={"source_file": pl.String, "source_row": pl.Int64, "reason": pl.String, "detail": pl.String},
    )


def _suffix(path: Path) -> str | None:
    name = path.name.lower()
    return next((s for s in SUFFIXES if name.endswith(s)), None)


def partition_key_for(name: str) -> str:
    """A safe, stable partition key from a file or folder name."""
    for s in SUFFIXES:
        if name.lower().endswith(s):
            name = name[: -len(s)]
            break
    key = re.sub(r"[^A-Za-z0-9._=-]+", "-", name).strip("-.")
    return key[:200] or "unnamed"


def discover_sources(folder: str | Path, subfolders_are_sources: bool) -> dict[str, list[Path]]:
    """Map partition key -> input files. Top-level files are one source each; with
    `subfolders_are_sources` each immediate subfolder is one source made of all its files."""
    root = Path(folder)
    if not root.is_dir():
        raise FileNotFoundError(f"input folder {root} does not exist")
    found: dict[str, list[Path]] = {}
    for p in sorted(root.iterdir()):
        if p.name.startswith("."):
            continue
        if p.is_file() and _suffix(p):
            found.setdefault(partition_key_for(p.name), []).append(p)
        elif p.is_dir() and subfolders_are_sources:
            files = sorted(f for f in p.rglob("*") if f.is_file() and _suffix(f) and not f.name.startswith("."))
            if files:
                found.setdefault(partition_key_for(p.name), []).extend(files)
    return found


def _read_jsonl(path: Path, report: ReadReport) -> pl.DataFrame:
    opener = gzip.open if path.name.lower().endswith(".gz") else open
    rows: list[dict[str, object]] = []
    try:
        with opener(path, "rb") as raw:  # type: ignore[operator]
            for lineno, line in enumerate(io.TextIOWrapper(raw, encoding="utf-8", errors="replace"), start=1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    report.malformed_lines.append((path.name, lineno, f"invalid JSON: {e.msg}"))
                    continue
                if not isinstance(obj, dict):
                    got = type(obj).__name__
                    report.malformed_lines.append((path.name, lineno, f"expected a JSON object, got {got}"))
                    continue
                rows.append(obj)
    except (OSError, EOFError) as e:
        raise InputFormatError(f"{path}: cannot read file: {e}") from e
    if not rows:
        return pl.DataFrame()
    # Values of differing types across rows are kept as JSON text rather than failing the file.
    return pl.DataFrame(rows, infer_schema_length=None, strict=False)


def read_table(path: Path, report: ReadReport | None = None) -> pl.DataFrame:
    report = report if report is not None else ReadReport()
    suffix = _suffix(path)
    if suffix is None:
        raise InputFormatError(f"{path}: unsupported file type (expected one of {', '.join(SUFFIXES)})")
    if suffix == ".parquet":
        try:
            df = pl.read_parquet(path)
        except Exception as e:  # polars raises several error types for corrupt files
            raise InputFormatError(f"{path}: not a readable Parquet file: {e}") from e
    else:
        df = _read_jsonl(path, report)
    report.rows += df.height
    return df


def pick_column(df: pl.DataFrame, candidates: tuple[str, ...], path: Path, what: str,
                required: bool = True) -> str | None:
    for c in candidates:
        if c in df.columns:
            return c
    if required and df.height:
        raise InputFormatError(
            f"{path}: no {what} column; expected one of {', '.join(candidates)}, found {', '.join(df.columns)}"
        )
    return None


def normalise_texts(df: pl.DataFrame, path: Path) -> pl.DataFrame:
    """Canonical columns: source_row, source_id, text, url, metadata (JSON of every other column)."""
    if df.height == 0:
        return pl.DataFrame(schema={"source_file": pl.String, "source_row": pl.Int64, "source_id": pl.String,
                                    "text": pl.String, "url": pl.String, "metadata": pl.String})
    text_col = pick_column(df, TEXT_COLUMNS, path, "text")
    id_col = pick_column(df, ID_COLUMNS, path, "id", required=False)
    url_col = pick_column(df, URL_COLUMNS, path, "url", required=False)
    if df.schema[text_col] not in (pl.String, pl.Null):
        raise InputFormatError(f"{path}: column {text_col!r} must hold strings, found {df.schema[text_col]}")
    used = {text_col, id_col, url_col}
    rest = [c for c in df.columns if c not in used]
    meta = (pl.struct(rest).struct.json_encode() if rest else pl.lit("{}")).alias("metadata")
    return df.with_row_index("source_row").select(
        pl.lit(path.name).alias("source_file"),
        pl.col("source_row").cast(pl.Int64),
        (pl.col(id_col).cast(pl.String) if id_col else pl.lit(None, pl.String)).alias("source_id"),
        pl.col(text_col).cast(pl.String).alias("text"),
        (pl.col(url_col).cast(pl.String) if url_col else pl.lit(None, pl.String)).alias("url"),
        meta,
    )


def read_texts(paths: list[Path]) -> tuple[pl.DataFrame, ReadReport]:
    """Read and normalise every file of one source/shard; malformed JSONL lines are reported, not fatal."""
    report = ReadReport()
    frames = [normalise_texts(read_table(p, report), p) for p in paths]
    return pl.concat(frames, how="vertical") if frames else normalise_texts(pl.DataFrame(), Path("")), report
