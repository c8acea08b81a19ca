"""Parquet tables under one storage root (a local folder or `s3://bucket/prefix`), written atomically.

Layout: `<root>/<table>/<partition>.parquet` (partitioned) or `<root>/<table>/all.parquet`, plus
`<root>/quarantine/<table>/<partition>.parquet` for rejected rows. A partition is written to a
temporary file in the same folder and renamed into place, so readers never see half a file and a
re-run replaces the partition exactly.

With an `s3://` root the bucket is the source of truth and a local folder is its working copy: every
write is uploaded as one object PUT (S3 replaces an object whole, so readers never see a partial
partition), and every read first brings the working copy up to date with the bucket (objects whose ETag
changed are downloaded, objects gone from the bucket are removed). DuckDB and Polars then read local
files: DuckDB here cannot load its S3 extension, and local reads keep the lineage and dedup queries fast.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

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


def split_s3_uri(uri: str) -> tuple[str, str]:
    """`s3://bucket/some/prefix/` -> ("bucket", "some/prefix")."""
    rest = uri.removeprefix("s3://")
    bucket, _, prefix = rest.partition("/")
    if not bucket:
        raise ValueError(f"storage root {uri!r}: an S3 root must name a bucket (s3://bucket/prefix)")
    return bucket, prefix.strip("/")


def default_working_copy(uri: str) -> Path:
    """Where an S3 root's working copy lives when FINEINSTRUCTIONS_CACHE_DIR is not set."""
    base = os.environ.get("FINEINSTRUCTIONS_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "fineinstructions")
    bucket, prefix = split_s3_uri(uri)
    return Path(base) / "s3" / bucket / (prefix or "_root")


class S3Mirror:
    """Keeps folders of a local working copy in step with the same keys under an S3 prefix.

    Written by hand rather than with s3fs: s3fs pins aiobotocore, which conflicts with the boto3 that
    dagster-aws brings; the three operations needed here (list, get, put) are a few boto3 calls.
    """

    STATE = ".s3-etags.json"  # per folder: key -> ETag of the object the local file was last synced with

    def __init__(self, uri: str, local: Path, client: Any):
        self.uri = uri.rstrip("/")
        self.bucket, self.prefix = split_s3_uri(uri)
        self.local = local
        self.client = client

    def key(self, rel: str) -> str:
        return f"{self.prefix}/{rel}" if self.prefix else rel

    def _state(self, folder: Path) -> dict[str, str]:
        f = folder / self.STATE
        return json.loads(f.read_text()) if f.exists() else {}

    def _save_state(self, folder: Path, state: dict[str, str]) -> None:
        with _atomic_file(folder / self.STATE) as tmp:
            Path(tmp).write_text(json.dumps(state, sort_keys=True))

    @contextmanager
    def lock(self) -> Iterator[None]:
        """One process at a time syncs or publishes in this working copy (several runs may share it)."""
        self.local.mkdir(parents=True, exist_ok=True)
        with (self.local / ".s3-sync.lock").open("w") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    def upload(self, source: str | Path, target: Path) -> str:
        """Upload a complete file as the object for `target` (a path of the working copy); its ETag.
        boto3's managed upload goes multipart above 8 MB, so objects past the 5 GB single-PUT limit work;
        S3 still makes the object visible only once it is complete."""
        key = self.key(target.relative_to(self.local).as_posix())
        self.client.upload_file(str(source), self.bucket, key)
        return self.client.head_object(Bucket=self.bucket, Key=key)["ETag"]

    def record(self, target: Path, etag: str) -> None:
        state = self._state(target.parent)
        state[target.name] = etag
        self._save_state(target.parent, state)

    def _remote(self, rel_folder: str) -> dict[str, str]:
        """name -> ETag of every object directly under the folder (sub-folders are separate folders)."""
        prefix = self.key(rel_folder).rstrip("/") + "/"
        found: dict[str, str] = {}
        for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix,
                                                                          Delimiter="/"):
            for obj in page.get("Contents", []):
                found[obj["Key"][len(prefix):]] = obj["ETag"]
        return found

    def pull_one(self, path: Path) -> None:
        """Bring one file up to date (download, or remove it locally if the object is gone)."""
        rel = path.relative_to(self.local).as_posix()
        try:
            head = self.client.head_object(Bucket=self.bucket, Key=self.key(rel))
        except self.client.exceptions.ClientError as e:
            if e.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                path.unlink(missing_ok=True)
                return
            raise
        state = self._state(path.parent)
        if path.exists() and state.get(path.name) == head["ETag"]:
            return
        self._download(rel, path, state, head["ETag"])

    def pull_folder(self, folder: Path) -> None:
        """Bring every file directly in a folder up to date with the objects under the same prefix."""
        rel_folder = folder.relative_to(self.local).as_posix()
        remote = self._remote(rel_folder)
        if not remote and not folder.exists():
            return
        state = self._state(folder) if folder.exists() else {}
        for name, etag in remote.items():
            if name == self.STATE:
                continue
            target = folder / name
            if not (target.exists() and state.get(name) == etag):
                self._download(f"{rel_folder}/{name}", target, state, etag)
        if folder.exists():  # files deleted from the bucket (e.g. a partition removed) go locally too
            for f in folder.iterdir():
                if f.is_file() and not f.name.startswith(".") and f.name not in remote:
                    f.unlink()
                    state.pop(f.name, None)
            self._save_state(folder, state)

    def _download(self, rel: str, target: Path, state: dict[str, str], etag: str) -> None:
        with _atomic_file(target) as tmp:
            self.client.download_file(self.bucket, self.key(rel), tmp)
        state[target.name] = etag
        self._save_state(target.parent, state)

    def upload_folder(self, source: Path, folder: Path, last: str = "meta.json") -> dict[str, str]:
        """Make the objects under `folder`'s prefix equal to the files of `source` (built aside): upload each,
        `last` after the others, then delete the objects it no longer has. Returns name -> ETag.
        A reader that syncs mid-way sees the old `last` (meta.json: embedder, bank hash, counts) with some new
        files; opening the index then fails its meta check rather than using a mixed index."""
        rel_folder = folder.relative_to(self.local).as_posix()
        files = sorted((f for f in source.iterdir() if f.is_file() and not f.name.startswith(".")),
                       key=lambda f: (f.name == last, f.name))
        stale = set(self._remote(rel_folder)) - {f.name for f in files}
        etags = {f.name: self.upload(f, folder / f.name) for f in files}
        for name in stale:
            self.client.delete_object(Bucket=self.bucket, Key=self.key(f"{rel_folder}/{name}"))
        return etags


class TableStore:
    """Reads and writes the platform's tables under a storage root: a local folder, or `s3://bucket/prefix`
    with a local working copy (`working_copy`, default under FINEINSTRUCTIONS_CACHE_DIR)."""

    def __init__(self, root: str | os.PathLike[str], s3_client: Any = None,
                 working_copy: str | os.PathLike[str] | None = None):
        root = str(root)
        self.uri = root
        self.mirror: S3Mirror | None = None
        if root.startswith("s3://"):
            local = Path(working_copy) if working_copy else default_working_copy(root)
            self.root = local.resolve()
            if s3_client is None:
                import boto3  # endpoint (AWS_ENDPOINT_URL), region and credentials from the environment

                s3_client = boto3.client("s3")
            self.mirror = S3Mirror(root, self.root, s3_client)
        else:
            self.root = Path(root).resolve()
            self.uri = str(self.root)

    def uri_of(self, path: Path) -> str:
        """Where a file of the working copy lives for users: its s3:// URI, or the local path."""
        if self.mirror is None:
            return str(path)
        return f"{self.mirror.uri}/{path.relative_to(self.root).as_posix()}"

    def _folder(self, table: str, quarantine: bool) -> Path:
        return self.root / "quarantine" / table if quarantine else self.root / table

    def _sync_folder(self, folder: Path) -> None:
        if self.mirror is not None:
            with self.mirror.lock():
                self.mirror.pull_folder(folder)

    @contextmanager
    def _published(self, target: Path) -> Iterator[str]:
        """A temporary path for the new version of `target`. Locally it is renamed into place when the block
        succeeds; with an S3 root it is uploaded first and renamed only once the bucket holds it, so a failed
        upload leaves both the bucket and the working copy at the previous version."""
        if self.mirror is None:
            with _atomic_file(target) as tmp:
                yield tmp
            return
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
        os.close(fd)
        try:
            yield tmp
            with self.mirror.lock():
                etag = self.mirror.upload(tmp, target)
                os.replace(tmp, target)
                self.mirror.record(target, etag)
        finally:
            Path(tmp).unlink(missing_ok=True)

    def path(self, table: str, partition: str = UNPARTITIONED, quarantine: bool = False) -> Path:
        """The partition's file in the (local) working copy; no synchronisation."""
        return self._folder(table, quarantine) / f"{check_partition_key(partition)}.parquet"

    def write_jsonl(self, table: str, df: pl.DataFrame, partition: str = UNPARTITIONED) -> Path:
        """The same partition as JSON Lines beside its Parquet file (for loaders that want JSON), atomically."""
        target = self.path(table, partition).with_suffix(".jsonl")
        with self._published(target) as tmp:
            df.write_ndjson(tmp)
        return target

    def write_json(self, name: str, obj: Any) -> Path:
        """A small JSON document (e.g. the dataset report) at `<root>/<name>`, atomically."""
        target = self.root / name
        with self._published(target) as tmp:
            Path(tmp).write_text(json.dumps(obj, indent=2))
        return target

    def dir(self, name: str) -> Path:
        """A folder of files kept together (the template index), brought up to date first."""
        folder = self.root / name
        self._sync_folder(folder)
        return folder

    def write(
        self, table: str, df: pl.DataFrame, partition: str = UNPARTITIONED, quarantine: bool = False
    ) -> Path:
        target = self.path(table, partition, quarantine)
        with self._published(target) as tmp:
            df.write_parquet(tmp, compression="zstd", statistics=True)
        return target

    def exists(self, table: str, partition: str = UNPARTITIONED, quarantine: bool = False) -> bool:
        p = self.path(table, partition, quarantine)
        if self.mirror is not None:
            with self.mirror.lock():
                self.mirror.pull_one(p)
        return p.exists()

    def read(self, table: str, partition: str = UNPARTITIONED, quarantine: bool = False) -> pl.DataFrame:
        p = self.path(table, partition, quarantine)
        if not self.exists(table, partition, quarantine):
            kind = "quarantine table" if quarantine else "table"
            raise FileNotFoundError(
                f"{kind} {table!r} partition {partition!r} is not materialized yet (expected "
                f"{self.uri_of(p)})"
            )
        return pl.read_parquet(p)

    def partitions(self, table: str, quarantine: bool = False) -> list[str]:
        base = self._folder(table, quarantine)
        self._sync_folder(base)
        if not base.exists():
            return []
        return sorted(p.stem for p in base.glob("*.parquet"))

    def glob(self, table: str, quarantine: bool = False) -> str:
        """A glob DuckDB/Polars can scan across every partition of a table (of the synced working copy)."""
        base = self._folder(table, quarantine)
        self._sync_folder(base)
        return str(base / "*.parquet")

    def glob_if_any(self, table: str, quarantine: bool = False) -> str | None:
        """`glob()` when the table has a partition, else None: one sync (one listing with an S3 root)."""
        found = self.glob(table, quarantine)
        return found if any(Path(found).parent.glob("*.parquet")) else None

    def sync(self, tables: list[str] | None = None) -> None:
        """Bring whole tables (default: every table in the bucket) up to date, e.g. before dbt reads them."""
        if self.mirror is None:
            return
        names = tables if tables is not None else self.remote_tables()
        for t in names:
            self._sync_folder(self._folder(t, False))
            self._sync_folder(self._folder(t, True))

    def remote_tables(self) -> list[str]:
        if self.mirror is None:
            return sorted(p.name for p in self.root.iterdir() if p.is_dir() and not p.name.startswith("."))
        prefix = self.mirror.key("")
        out: set[str] = set()
        for page in self.mirror.client.get_paginator("list_objects_v2").paginate(
                Bucket=self.mirror.bucket, Prefix=prefix, Delimiter="/"):
            out.update(p["Prefix"][len(prefix):].strip("/") for p in page.get("CommonPrefixes", []))
        return sorted(t for t in out if t and t != "quarantine" and not t.startswith((".", "_")))

    def scan_all(self, table: str, quarantine: bool = False) -> pl.LazyFrame | None:
        found = self.glob_if_any(table, quarantine)
        return pl.scan_parquet(found) if found else None

    def write_parts(self, table: str, parts: list[Path], empty: pl.DataFrame, partition: str = UNPARTITIONED,
                    quarantine: bool = False) -> Path:
        """Stream part files (written batch by batch) into one partition file, atomically."""
        target = self.path(table, partition, quarantine)
        with self._published(target) as tmp:
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
        """Build a folder (e.g. an index and its id map) aside, then swap it into place whole (with an S3 root:
        uploaded first, meta.json last, and swapped locally only once the bucket holds it)."""
        final = self.root / name
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
        try:
            yield tmp
            with self.mirror.lock() if self.mirror is not None else nullcontext():
                etags = self.mirror.upload_folder(tmp, final) if self.mirror is not None else {}
                old = final.with_name(f".{final.name}.old")
                if final.exists():
                    shutil.rmtree(old, ignore_errors=True)
                    os.replace(final, old)
                os.replace(tmp, final)
                shutil.rmtree(old, ignore_errors=True)
                if self.mirror is not None:
                    self.mirror._save_state(final, etags)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
