"""Reading input files in the formats people have: Parquet and JSON Lines (plain, .gz or .zst), with
FineWeb / DCLM / Nemotron-CC / HF-datasets-style columns, from local folders or `s3://` prefixes.

Files are streamed in batches (Parquet row groups through pyarrow, JSON Lines line by line through
pyarrow's decompressing streams), so a shard larger than memory is never loaded whole. An s3:// input is
listed and fetched (once per version of the object) with the platform's one S3 client, boto3, as the tables
are (lib/storage.py): credentials, region and `AWS_ENDPOINT_URL` come from the environment.

Nothing is changed silently: a JSON Lines line that is not valid UTF-8, not a JSON object, or whose text
field is not a string is quarantined with its file, line number and reason (never decoded with
replacement characters, never coerced); a Parquet file whose text column is not a string column, or that
holds invalid UTF-8, fails with an InputFormatError naming the file and column.
"""

from __future__ import annotations

import hashlib
import io
import json
import posixpath
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, NamedTuple

import polars as pl
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

SUFFIXES = (".parquet", ".jsonl", ".jsonl.gz", ".jsonl.zst", ".json", ".json.gz", ".json.zst", ".ndjson")
TEXT_COLUMNS = ("text", "content", "raw_content", "query", "question", "instruction", "prompt")
ID_COLUMNS = ("id", "doc_id", "query_id", "warc_record_id", "uuid")
URL_COLUMNS = ("url", "source_url", "link")
NORMALISED_SCHEMA = {"source_file": pl.String, "source_row": pl.Int64, "source_id": pl.String, "text": pl.String,
                     "url": pl.String, "metadata": pl.String}
# Quarantine reasons of input lines that never reach a stage (counted as dropped_<reason>).
QUARANTINE_REASONS = ("malformed_json", "invalid_utf8", "text_not_string", "no_text_field")
# Not data: Spark/Hadoop markers (_SUCCESS, _delta_log/, _temporary/) and hidden files (.DS_Store, .git/,
# .part-0.parquet.crc). Paths with a part starting with these are ignored without a note.
IGNORED_PREFIXES = (".", "_")
_SURROGATE = re.compile("[\ud800-\udfff]")  # lone surrogates (JSON "\ud800" escapes) cannot be UTF-8
_COMPACT_JSON = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"))  # built once: faster than dumps
_STRING_TYPES = (pa.types.is_string, pa.types.is_large_string, pa.types.is_string_view, pa.types.is_null)


class InputFormatError(ValueError):
    """An input file that cannot be read as a table of texts; the message names the file and problem."""


@dataclass
class ReadReport:
    rows: int = 0
    quarantined: list[tuple[str, int, str, str]] = field(default_factory=list)  # (file, line, reason, detail)


class SkippedInput(NamedTuple):
    """An input file that discovery did not turn into a partition, and why."""

    path: str
    reason: str


@dataclass
class Discovery:
    sources: dict[str, list[str]]  # partition key -> input files (paths or URIs)
    skipped: list[SkippedInput]


def malformed_frame(report: ReadReport) -> pl.DataFrame:
    """Quarantined input lines as quarantine rows (source_file, source_row, reason, detail)."""
    return pl.DataFrame(
        [{"source_file": f, "source_row": n, "reason": r, "detail": d} for f, n, r, d in report.quarantined],
        schema={"source_file": pl.String, "source_row": pl.Int64, "reason": pl.String, "detail": pl.String},
    )


def _suffix(name: str) -> str | None:
    name = name.lower()
    return next((s for s in SUFFIXES if name.endswith(s)), None)


def local_input(path: str) -> str:
    """A local path to read an input from: the path itself, or for an s3:// URI a local copy of the object
    (lib/storage: the platform's one S3 client, the same as for the tables)."""
    if path.startswith("s3://"):
        from fineinstructions_dagster.lib.storage import local_copy

        return str(local_copy(path))
    if "://" in path:
        raise InputFormatError(f"{path}: only local paths and s3:// URIs are read")
    return path


def input_versions(paths: list[str]) -> dict[str, tuple[int, str]]:
    """path -> (size, version) of input files, what tells that one changed: its mtime locally, its ETag on S3.
    S3 objects are read from one listing per bucket (under the paths' common prefix), not one HEAD each: the
    sensors ask every minute, over every shard."""
    out: dict[str, tuple[int, str]] = {}
    by_bucket: dict[str, list[str]] = {}
    for path in paths:
        if path.startswith("s3://"):
            bucket, _, key = path[len("s3://"):].partition("/")
            by_bucket.setdefault(bucket, []).append(key)
        else:
            stat = Path(path).stat()
            out[path] = (stat.st_size, str(stat.st_mtime_ns))
    if by_bucket:
        from fineinstructions_dagster.lib.storage import default_s3_client

        client = default_s3_client()
        for bucket, keys in by_bucket.items():
            wanted, prefix = set(keys), posixpath.commonprefix(keys)
            for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
                for obj in page.get("Contents", []):
                    if obj["Key"] in wanted:
                        out[f"s3://{bucket}/{obj['Key']}"] = (int(obj["Size"]), str(obj["ETag"]))
        missing = [p for p in paths if p not in out]
        if missing:
            raise FileNotFoundError(f"input file {missing[0]} is gone (listed, then not found)")
    return out


def list_input_files(folder: str) -> list[tuple[PurePosixPath, str]]:
    """Every file under an input folder (any depth), as (path relative to the folder, path or s3:// URI)."""
    if folder.startswith("s3://"):
        from fineinstructions_dagster.lib.storage import list_s3_files

        base = folder.rstrip("/")
        return [(PurePosixPath(uri[len(base) + 1:]), uri) for uri in list_s3_files(base)]
    root = Path(folder)
    if not root.is_dir():
        raise FileNotFoundError(f"input folder {folder} does not exist")
    return sorted(((PurePosixPath(f.relative_to(root).as_posix()), str(f)) for f in root.rglob("*") if f.is_file()),
                  key=lambda e: e[1])


def partition_key_for(name: str) -> str:
    """A safe, stable partition key from a file or folder name (passes storage.check_partition_key)."""
    suffix = _suffix(name)
    if suffix:
        name = name[: -len(suffix)]
    key = re.sub(r"[^A-Za-z0-9._=-]+", "-", name)
    key = re.sub(r"\.{2,}", ".", key)  # '..' is refused in keys (and '...' by Dagster)
    key = re.sub(r"^[^A-Za-z0-9]+", "", key).rstrip("-.")
    return key[:200].rstrip("-.") or "unnamed"


def _short_hash(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:8]


def _assign_keys(units: list[tuple[str, ...]], is_folder: list[bool]) -> list[str]:
    """Partition keys for input units (relative path parts of a file, or of a query-source folder)."""
    def base(parts: tuple[str, ...]) -> str:
        return "__".join(partition_key_for(p) for p in parts)

    def with_suffix(parts: tuple[str, ...], folder: bool) -> str:
        return base(parts) if folder else base(parts) + (_suffix(parts[-1]) or "")

    keys = [base(u) for u in units]
    for step in (1, 2):
        seen: dict[str, int] = {}
        for k in keys:
            seen[k] = seen.get(k, 0) + 1
        for i, (u, k) in enumerate(zip(units, keys, strict=True)):
            if seen[k] > 1:
                keys[i] = with_suffix(u, is_folder[i]) if step == 1 else f"{k}-{_short_hash('/'.join(u))}"
    # Too long for a key: keep a readable prefix and make it unique with a hash of the whole path.
    return [k if len(k) <= 200 else f"{k[:191].rstrip('-.')}-{_short_hash(k)}" for k in keys]


def scan_inputs(folder: str, subfolders_are_sources: bool) -> Discovery:
    """Partitions of an input folder, and the files that are not part of any.

    Every file under `folder` (any depth) with a supported suffix belongs to one partition; other files are
    listed in `skipped` with the reason (paths with a part starting with '.' or '_' are not data and are
    ignored, see IGNORED_PREFIXES). With `subfolders_are_sources` (query sources) each top-level file is
    one partition and each immediate subfolder is one partition made of every file under it; otherwise
    (corpus shards) every file is its own partition, nested ones included (FineWeb's data/<dump>/*.parquet).

    Keys: the relative path with the suffix removed, each part made safe and parts joined by '__'
    (`tutorial.parquet` -> `tutorial`, `data/CC-MAIN-2024-10/000_00000.parquet` ->
    `data__CC-MAIN-2024-10__000_00000`). Files whose keys would collide keep their suffix
    (`x.jsonl` and `x.parquet` -> `x.jsonl` and `x.parquet`): one partition per file whatever its
    extension, never two files merged. A key depends only on the set of files present, so it is stable
    across re-runs; a colliding file added later renames the partition of the file it collides with
    (`x` -> `x.jsonl`), and the old key then fails loudly as having no input file. Keys still equal after
    that (names that differ only in characters made safe) get a hash of their path appended.
    """
    units: dict[tuple[str, ...], list[str]] = {}
    folders: dict[tuple[str, ...], bool] = {}
    skipped: list[SkippedInput] = []
    for rel, path in list_input_files(str(folder)):
        if any(p.startswith(IGNORED_PREFIXES) for p in rel.parts):
            continue
        if not _suffix(rel.name):
            ext = "".join(PurePosixPath(rel.name).suffixes[-2:]) or "no extension"
            skipped.append(SkippedInput(path, f"unsupported file type ({ext}); readable: {', '.join(SUFFIXES)}"))
            continue
        folder_unit = subfolders_are_sources and len(rel.parts) > 1
        unit = rel.parts[:1] if folder_unit else rel.parts
        units.setdefault(unit, []).append(path)
        folders[unit] = folder_unit
    keys = _assign_keys(list(units), [folders[u] for u in units])
    return Discovery(dict(zip(keys, units.values(), strict=True)), skipped)


def discover_sources(folder: str, subfolders_are_sources: bool) -> dict[str, list[str]]:
    """Map partition key -> input files (paths or URIs); see scan_inputs for the rules."""
    return scan_inputs(folder, subfolders_are_sources).sources


def _name(path: str) -> str:
    return PurePosixPath(path.split("://", 1)[-1]).name


def display_names(paths: list[str]) -> dict[str, str]:
    """`source_file` of each path: its name, or its path below the common folder when names repeat
    (a query source's subfolders may both hold `part-0.jsonl`)."""
    names = {p: _name(p) for p in paths}
    if len(set(names.values())) == len(names):
        return names
    inner = {p: p.split("://", 1)[-1] for p in paths}
    root = posixpath.commonpath([posixpath.dirname(i) for i in inner.values()])
    return {p: posixpath.relpath(i, root) for p, i in inner.items()}


def _json_type(value: object) -> str:
    return {bool: "boolean", int: "number", float: "number", list: "array", dict: "object"}.get(
        type(value), "null" if value is None else type(value).__name__)


def _as_string(value: object) -> str | None:
    """An id or url value as text: strings unchanged, numbers as written in JSON."""
    return value if isinstance(value, str) or value is None else json.dumps(value, ensure_ascii=False)


def _iter_jsonl(path: str, name: str, batch_rows: int, report: ReadReport) -> Iterator[pl.DataFrame]:
    """Normalised batches of a JSON Lines file. The text, id and url fields are the first of TEXT_COLUMNS,
    ID_COLUMNS and URL_COLUMNS present in the file's first object; every other field goes to `metadata`
    as JSON, exactly as written (no type inference across rows)."""
    local = local_input(path)
    lower = name.lower()
    compression = "gzip" if lower.endswith(".gz") else "zstd" if lower.endswith(".zst") else None
    cols: dict[str, list[Any]] = {c: [] for c in NORMALISED_SCHEMA if c != "source_file"}
    fields: tuple[str, str | None, str | None] | None = None

    def flush() -> pl.DataFrame:
        df = pl.DataFrame(cols, schema={c: t for c, t in NORMALISED_SCHEMA.items() if c != "source_file"})
        for values in cols.values():
            values.clear()
        return df.select(pl.lit(name).alias("source_file"), pl.all())

    def quarantine(lineno: int, reason: str, detail: str) -> None:
        report.quarantined.append((name, lineno, reason, detail))

    try:
        with pafs.LocalFileSystem().open_input_stream(local, compression=compression) as raw:
            # Bytes, split on b"\n" only (line numbers are what `sed -n Np` shows), each line decoded
            # strictly: a line that is not UTF-8 is quarantined, never decoded with replacement characters.
            for lineno, data in enumerate(io.BufferedReader(raw, 1 << 20), start=1):
                if lineno == 1:
                    data = data.removeprefix(b"\xef\xbb\xbf")  # a byte-order mark is encoding, not data
                try:
                    line = data.decode("utf-8")
                except UnicodeDecodeError as e:
                    quarantine(lineno, "invalid_utf8", f"byte 0x{data[e.start]:02x} at byte {e.start + 1} "
                                                       "is not UTF-8")
                    continue
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    quarantine(lineno, "malformed_json", f"invalid JSON: {e.msg}")
                    continue
                if not isinstance(obj, dict):
                    quarantine(lineno, "malformed_json", f"expected a JSON object, got {_json_type(obj)}")
                    continue
                if ("\\ud" in line or "\\uD" in line) and _SURROGATE.search(_COMPACT_JSON.encode(obj)):
                    quarantine(lineno, "invalid_utf8", "a \\uD800-\\uDFFF escape without its pair")
                    continue
                if fields is None:
                    text_f = next((c for c in TEXT_COLUMNS if c in obj), None)
                    if text_f is None:
                        raise InputFormatError(f"{path}: no text field on line {lineno}; expected one of "
                                               f"{', '.join(TEXT_COLUMNS)}, found {', '.join(obj)}")
                    fields = (text_f, next((c for c in ID_COLUMNS if c in obj), None),
                              next((c for c in URL_COLUMNS if c in obj), None))
                text_f, id_f, url_f = fields
                if text_f not in obj:
                    quarantine(lineno, "no_text_field", f"no field {text_f!r} (the text field of this file)")
                    continue
                text = obj.pop(text_f)
                if not isinstance(text, str):
                    quarantine(lineno, "text_not_string", f"field {text_f!r} is a JSON {_json_type(text)}, "
                                                          "not a string")
                    continue
                cols["source_row"].append(lineno)
                cols["text"].append(text)
                cols["source_id"].append(_as_string(obj.pop(id_f, None)) if id_f else None)
                cols["url"].append(_as_string(obj.pop(url_f, None)) if url_f else None)
                cols["metadata"].append(_COMPACT_JSON.encode(obj))
                if len(cols["text"]) >= batch_rows:
                    yield flush()
    except OSError as e:
        raise InputFormatError(f"{path}: cannot read file: {e}") from e
    if cols["text"]:
        yield flush()


def _first_invalid_column(batch: pa.RecordBatch) -> str | None:
    for col_name, col in zip(batch.schema.names, batch.columns, strict=True):
        try:
            col.validate(full=True)
        except pa.ArrowInvalid:
            return col_name
    return None


def _iter_parquet(path: str, name: str, batch_rows: int) -> Iterator[pl.DataFrame]:
    try:
        pf = pq.ParquetFile(local_input(path))
    except Exception as e:  # pyarrow raises several error types for corrupt files
        raise InputFormatError(f"{path}: not a readable Parquet file: {e}") from e
    if pf.metadata.num_rows == 0:
        return
    schema = pf.schema_arrow
    text_col = pick_column(schema.names, TEXT_COLUMNS, path, "text")
    assert text_col is not None
    text_type = schema.field(text_col).type
    if pa.types.is_dictionary(text_type):  # dictionary-encoded strings are strings
        text_type = text_type.value_type
    if not any(is_type(text_type) for is_type in _STRING_TYPES):
        raise InputFormatError(f"{path}: text column {text_col!r} has type {schema.field(text_col).type}; "
                               "expected strings (it is not converted: convert it before ingesting)")
    id_col = pick_column(schema.names, ID_COLUMNS, path, "id", required=False)
    url_col = pick_column(schema.names, URL_COLUMNS, path, "url", required=False)
    offset = 0
    try:
        for batch in pf.iter_batches(batch_size=batch_rows):
            try:  # Parquet does not guarantee valid UTF-8, and Polars must not be handed invalid strings
                batch.validate(full=True)
            except pa.ArrowInvalid as e:
                raise InputFormatError(f"{path}: column {_first_invalid_column(batch)!r} holds invalid UTF-8 or "
                                       f"invalid values in rows {offset + 1}-{offset + batch.num_rows}: {e}") from e
            df = pl.from_arrow(batch)
            assert isinstance(df, pl.DataFrame)
            df = df.with_columns(pl.int_range(offset + 1, offset + df.height + 1).alias("__line"))
            offset += df.height
            yield normalise_texts(df, path, name, text_col, id_col, url_col)
    except OSError as e:
        raise InputFormatError(f"{path}: Parquet file is damaged after row {offset}: {e}") from e


def pick_column(columns: list[str], candidates: tuple[str, ...], path: str, what: str,
                required: bool = True) -> str | None:
    for c in candidates:
        if c in columns:
            return c
    if required:
        found = ", ".join(c for c in columns if c != "__line")
        raise InputFormatError(f"{path}: no {what} column; expected one of {', '.join(candidates)}, found {found}")
    return None


def normalise_texts(df: pl.DataFrame, path: str, name: str, text_col: str, id_col: str | None,
                    url_col: str | None) -> pl.DataFrame:
    """Canonical columns: source_file, source_row (1-based line/row, from `__line`), source_id, text, url,
    metadata (JSON of every other column)."""
    if df.schema[text_col] not in (pl.String, pl.Null, pl.Categorical, pl.Enum):
        raise InputFormatError(f"{path}: column {text_col!r} must hold strings, found {df.schema[text_col]}")
    used = {text_col, id_col, url_col, "__line"}
    rest = [c for c in df.columns if c not in used]
    meta = (pl.struct(rest).struct.json_encode() if rest else pl.lit("{}")).alias("metadata")
    try:
        return df.select(
            pl.lit(name).alias("source_file"),
            pl.col("__line").cast(pl.Int64).alias("source_row"),
            (pl.col(id_col).cast(pl.String) if id_col else pl.lit(None, pl.String)).alias("source_id"),
            pl.col(text_col).cast(pl.String).alias("text"),  # only string-like types reach here: no coercion
            (pl.col(url_col).cast(pl.String) if url_col else pl.lit(None, pl.String)).alias("url"),
            meta,
        )
    except pl.exceptions.PolarsError as e:
        raise InputFormatError(f"{path}: cannot normalise columns {id_col!r}, {url_col!r} or metadata "
                               f"({', '.join(rest)}): {e}") from e


def iter_text_batches(paths: list[str], batch_rows: int = 20_000,
                      report: ReadReport | None = None) -> Iterator[pl.DataFrame]:
    """Normalised batches of at most `batch_rows` rows over every file of one source or shard.
    Bad JSON Lines lines (QUARANTINE_REASONS) are recorded in `report` and skipped; an unreadable file
    raises InputFormatError naming it."""
    report = report if report is not None else ReadReport()
    paths = [str(p) for p in paths]
    names = display_names(paths)
    for path in paths:
        suffix = _suffix(_name(path))
        if suffix is None:
            raise InputFormatError(f"{path}: unsupported file type (expected one of {', '.join(SUFFIXES)})")
        batches = (_iter_parquet(path, names[path], batch_rows) if suffix == ".parquet"
                   else _iter_jsonl(path, names[path], batch_rows, report))
        for df in batches:
            report.rows += df.height
            yield df


def read_texts(paths: list[str]) -> tuple[pl.DataFrame, ReadReport]:
    """Every row of one source at once (query sources are small); see iter_text_batches for shards."""
    report = ReadReport()
    frames = list(iter_text_batches([str(p) for p in paths], report=report))
    return (pl.concat(frames, how="vertical_relaxed") if frames else pl.DataFrame(schema=NORMALISED_SCHEMA)), report
