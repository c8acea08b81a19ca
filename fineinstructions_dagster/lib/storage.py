"""Parquet tables under one storage root, written atomically.

Layout: `<root>/<table>/<partition>.parquet` (partitioned) or `<root>/<table>/all.parquet`, plus
`<root>/quarantine/<table>/<partition>.parquet` for rejected rows. A partition is written to a
temporary file in the same folder and renamed into place, so readers never see half a file and a
re-run replaces the partition exactly.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import polars as pl

UNPARTITIONED = "all"
_SAFE_KEY = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._=-]{0,199}$")


@contextmanager
def _atomic_file(target: Path) -> Iterator[str]:
    """A temporary path beside `target`, renamed onto it when the block succeeds and removed when it fails."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    try:
        yield tmp
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def check_partition_key(key: str) -> str:
    if not _SAFE_KEY.match(key) or ".." in key:
        raise ValueError(
            f"partition key {key!r} is not a safe file name (letters, digits, '.', '_', '-', '=' only)"
        )
    return key


class TableStore:
    """Reads and writes the platform's tables under a local storage root."""

    def __init__(self, root: str | os.PathLike[str]):
        root = str(root)
        if root.startswith("s3://"):
            raise NotImplementedError(
                f"storage root {root!r}: S3 storage roots are not supported yet; use a local folder"
            )
        self.root = Path(root).resolve()

    def path(self, table: str, partition: str = UNPARTITIONED, quarantine: bool = False) -> Path:
        base = self.root / "quarantine" / table if quarantine else self.root / table
        return base / f"{check_partition_key(partition)}.parquet"

    def write_jsonl(self, table: str, df: pl.DataFrame, partition: str = UNPARTITIONED) -> Path:
        """The same partition as JSON Lines beside its Parquet file (for loaders that want JSON), atomically."""
        target = self.path(table, partition).with_suffix(".jsonl")
        with _atomic_file(target) as tmp:
            df.write_ndjson(tmp)
        return target

    def dir(self, name: str) -> Path:
        return self.root / name

    def write(
        self, table: str, df: pl.DataFrame, partition: str = UNPARTITIONED, quarantine: bool = False
    ) -> Path:
        target = self.path(table, partition, quarantine)
        with _atomic_file(target) as tmp:
            df.write_parquet(tmp, compression="zstd", statistics=True)
        return target

    def exists(self, table: str, partition: str = UNPARTITIONED, quarantine: bool = False) -> bool:
        return self.path(table, partition, quarantine).exists()

    def read(self, table: str, partition: str = UNPARTITIONED, quarantine: bool = False) -> pl.DataFrame:
        p = self.path(table, partition, quarantine)
        if not p.exists():
            kind = "quarantine table" if quarantine else "table"
            raise FileNotFoundError(
                f"{kind} {table!r} partition {partition!r} is not materialized yet (expected {p})"
            )
        return pl.read_parquet(p)

    def partitions(self, table: str, quarantine: bool = False) -> list[str]:
        base = self.root / "quarantine" / table if quarantine else self.root / table
        if not base.exists():
            return []
        return sorted(p.stem for p in base.glob("*.parquet"))

    def glob(self, table: str, quarantine: bool = False) -> str:
        """A glob DuckDB/Polars can scan across every partition of a table."""
        base = self.root / "quarantine" / table if quarantine else self.root / table
        return str(base / "*.parquet")

    def scan_all(self, table: str, quarantine: bool = False) -> pl.LazyFrame | None:
        parts = self.partitions(table, quarantine)
        if not parts:
            return None
        return pl.scan_parquet(self.glob(table, quarantine))

    def write_parts(self, table: str, parts: list[Path], empty: pl.DataFrame, partition: str = UNPARTITIONED,
                    quarantine: bool = False) -> Path:
        """Stream part files (written batch by batch) into one partition file, atomically."""
        target = self.path(table, partition, quarantine)
        with _atomic_file(target) as tmp:
            if parts:
                pl.scan_parquet(parts).sink_parquet(tmp, compression="zstd")
            else:
                empty.write_parquet(tmp, compression="zstd")
        return target

    @contextmanager
    def scratch(self, name: str) -> Iterator[Path]:
        """A private folder for one run's intermediate files, removed afterwards whatever happens."""
        base = self.root / ".scratch"
        base.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f"{name}.", dir=base))
        try:
            yield tmp
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    @contextmanager
    def staged_dir(self, name: str) -> Iterator[Path]:
        """Build a folder (e.g. an index and its id map) aside, then swap it into place whole."""
        final = self.root / name
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
        try:
            yield tmp
            old = final.with_name(f".{final.name}.old")
            if final.exists():
                shutil.rmtree(old, ignore_errors=True)
                os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
