"""Reading input files in the formats people have: Parquet and JSON Lines (plain, .gz or .zst), with
FineWeb / DCLM / Nemotron-CC / HF-datasets-style columns, from local folders or `s3://` prefixes.

Files are streamed in batches (Parquet row groups through pyarrow, JSON Lines line by line through
pyarrow's decompressing streams), so a shard larger than memory is never loaded whole. S3 goes through
pyarrow's S3 filesystem: credentials, region and `AWS_ENDPOINT_URL` come from the environment.
"""

from __future__ import annotations

import io
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import PurePosixPath

import polars as pl
import pyarrow.fs as pafs
import pyarrow.parquet as pq

SUFFIXES = (".parquet", ".jsonl", ".jsonl.gz", ".jsonl.zst", ".json", ".json.gz", ".json.zst", ".ndjson")
TEXT_COLUMNS = ("text", "content", "raw_content", "query", "question", "instruction", "prompt")
ID_COLUMNS = ("id", "doc_id", "query_id", "warc_record_id", "uuid")
URL_COLUMNS = ("url", "source_url", "link")
NORMALISED_SCHEMA = {"source_file": pl.String, "source_row": pl.Int64, "source_id": pl.String, "text": pl.String,
                     "url": pl.String, "metadata": pl.String}


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


def _suffix(name: str) -> str | None:
    name = name.lower()
    return next((s for s in SUFFIXES if name.endswith(s)), None)


def filesystem(path: str) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path inside it) for a local path or a URI such as s3://bucket/prefix."""
    if "://" in path:
        return pafs.FileSystem.from_uri(path)
    return pafs.LocalFileSystem(), str(PurePosixPath(path))


def partition_key_for(name: str) -> str:
    """A safe, stable partition key from a file or folder name."""
    suffix = _suffix(name)
    if suffix:
        name = name[: -len(suffix)]
    key = re.sub(r"[^A-Za-z0-9._=-]+", "-", name).strip("-.")
    return key[:200] or "unnamed"


def discover_sources(folder: str, subfolders_are_sources: bool) -> dict[str, list[str]]:
    """Map partition key -> input files (paths or URIs). Top-level files are one source each; with
    `subfolders_are_sources` each immediate subfolder is one source made of all its files."""
    fs, base = filesystem(str(folder))
    info = fs.get_file_info(base)
    if info.type != pafs.FileType.Directory:
        raise FileNotFoundError(f"input folder {folder} does not exist")
    scheme = str(folder).split("://", 1)[0] + "://" if "://" in str(folder) else ""
    found: dict[str, list[str]] = {}
    for entry in sorted(fs.get_file_info(pafs.FileSelector(base, recursive=True)), key=lambda e: e.path):
        rel = PurePosixPath(entry.path).relative_to(base)
        if entry.type != pafs.FileType.File or any(p.startswith(".") for p in rel.parts) or not _suffix(rel.name):
            continue
        if len(rel.parts) == 1:
            found.setdefault(partition_key_for(rel.name), []).append(scheme + entry.path)
        elif subfolders_are_sources:
            found.setdefault(partition_key_for(rel.parts[0]), []).append(scheme + entry.path)
    return found


def _name(path: str) -> str:
    return PurePosixPath(path.split("://", 1)[-1]).name


def _iter_jsonl(path: str, batch_rows: int, report: ReadReport) -> Iterator[pl.DataFrame]:
    fs, inner = filesystem(path)
    name = _name(path)
    compression = "gzip" if name.lower().endswith(".gz") else "zstd" if name.lower().endswith(".zst") else None
    rows: list[dict[str, object]] = []
    try:
        with fs.open_input_stream(inner, compression=compression) as raw:
            for lineno, line in enumerate(io.TextIOWrapper(raw, encoding="utf-8", errors="replace"), start=1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    report.malformed_lines.append((name, lineno, f"invalid JSON: {e.msg}"))
                    continue
                if not isinstance(obj, dict):
                    got = type(obj).__name__
                    report.malformed_lines.append((name, lineno, f"expected a JSON object, got {got}"))
                    continue
                obj["__line"] = lineno
                rows.append(obj)
                if len(rows) >= batch_rows:
                    yield pl.DataFrame(rows, infer_schema_length=None, strict=False)
                    rows = []
    except OSError as e:
        raise InputFormatError(f"{path}: cannot read file: {e}") from e
    if rows:
        yield pl.DataFrame(rows, infer_schema_length=None, strict=False)


def _iter_parquet(path: str, batch_rows: int) -> Iterator[pl.DataFrame]:
    fs, inner = filesystem(path)
    try:
        pf = pq.ParquetFile(fs.open_input_file(inner))
    except Exception as e:  # pyarrow raises several error types for corrupt files
        raise InputFormatError(f"{path}: not a readable Parquet file: {e}") from e
    offset = 0
    try:
        for batch in pf.iter_batches(batch_size=batch_rows):
            df = pl.from_arrow(batch)
            assert isinstance(df, pl.DataFrame)
            yield df.with_columns(pl.int_range(offset + 1, offset + df.height + 1).alias("__line"))
            offset += df.height
    except OSError as e:
        raise InputFormatError(f"{path}: Parquet file is damaged after row {offset}: {e}") from e


def pick_column(df: pl.DataFrame, candidates: tuple[str, ...], path: str, what: str,
                required: bool = True) -> str | None:
    for c in candidates:
        if c in df.columns:
            return c
    if required and df.height:
        found = ", ".join(c for c in df.columns if c != "__line")
        raise InputFormatError(f"{path}: no {what} column; expected one of {', '.join(candidates)}, found {found}")
    return None


def normalise_texts(df: pl.DataFrame, path: str) -> pl.DataFrame:
    """Canonical columns: source_file, source_row (1-based line/row), source_id, text, url, metadata
    (JSON of every other column)."""
    if df.height == 0:
        return pl.DataFrame(schema=NORMALISED_SCHEMA)
    if "__line" not in df.columns:
        df = df.with_columns(pl.int_range(1, df.height + 1).alias("__line"))
    text_col = pick_column(df, TEXT_COLUMNS, path, "text")
    id_col = pick_column(df, ID_COLUMNS, path, "id", required=False)
    url_col = pick_column(df, URL_COLUMNS, path, "url", required=False)
    if df.schema[text_col] not in (pl.String, pl.Null):
        raise InputFormatError(f"{path}: column {text_col!r} must hold strings, found {df.schema[text_col]}")
    used = {text_col, id_col, url_col, "__line"}
    rest = [c for c in df.columns if c not in used]
    meta = (pl.struct(rest).struct.json_encode() if rest else pl.lit("{}")).alias("metadata")
    return df.select(
        pl.lit(_name(path)).alias("source_file"),
        pl.col("__line").cast(pl.Int64).alias("source_row"),
        (pl.col(id_col).cast(pl.String) if id_col else pl.lit(None, pl.String)).alias("source_id"),
        pl.col(text_col).cast(pl.String).alias("text"),
        (pl.col(url_col).cast(pl.String) if url_col else pl.lit(None, pl.String)).alias("url"),
        meta,
    )


def iter_text_batches(paths: list[str], batch_rows: int = 20_000,
                      report: ReadReport | None = None) -> Iterator[pl.DataFrame]:
    """Normalised batches of at most `batch_rows` rows over every file of one source or shard.
    Malformed JSON lines are recorded in `report` and skipped; an unreadable file raises
    InputFormatError naming it."""
    report = report if report is not None else ReadReport()
    for path in paths:
        suffix = _suffix(_name(path))
        if suffix is None:
            raise InputFormatError(f"{path}: unsupported file type (expected one of {', '.join(SUFFIXES)})")
        batches = _iter_parquet(path, batch_rows) if suffix == ".parquet" else _iter_jsonl(path, batch_rows, report)
        for df in batches:
            report.rows += df.height
            yield normalise_texts(df, path)


def read_texts(paths: list[str]) -> tuple[pl.DataFrame, ReadReport]:
    """Every row of one source at once (query sources are small); see iter_text_batches for shards."""
    report = ReadReport()
    frames = list(iter_text_batches([str(p) for p in paths], report=report))
    return (pl.concat(frames, how="vertical_relaxed") if frames else pl.DataFrame(schema=NORMALISED_SCHEMA)), report
