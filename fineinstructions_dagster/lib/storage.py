"""Parquet tables under one storage root (a local folder or `s3://bucket/prefix`), written atomically.

Layout: `<root>/<table>/<partition>.parquet` (partitioned) or `<root>/<table>/all.parquet`, plus
`<root>/quarantine/<table>/<partition>.parquet` for rejected rows. A partition is written to a
temporary file in the same folder, fsynced and renamed into place, so readers never see half a file, a
crash never publishes an empty one, and a re-run replaces the partition exactly. Published files get the
mode `open()` would give them (0666 less the process umask). A folder of files kept together (the template
index) is published as a new version, `<root>/<name>/v-<time>-<label>/`, and the pointer file
`<root>/<name>/CURRENT` is switched to it in one rename.

Temporary names carry their writer, `.tmp-<pid>@<host hash>.<name>.<random>`: building a TableStore (and
opening a scratch folder) sweeps the leftovers of writers that are gone (a dead or replaced process on this
host; on another host, untouched for `STALE_AFTER_S`), and never those of a live concurrent run.

With an `s3://` root the bucket is the source of truth and a local folder is its working copy: every
write is uploaded as one object PUT (S3 replaces an object whole, so readers never see a partial
partition), and every read first brings the working copy up to date with the bucket (objects whose ETag
changed are downloaded, objects gone from the bucket are removed). DuckDB and Polars then read local
files: DuckDB here cannot load its S3 extension, and local reads keep the lineage and dedup queries fast.
"""

from __future__ import annotations

import errno
import fcntl
import functools
import hashlib
import json
import logging
import os
import re
import shutil
import socket
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import polars as pl

log = logging.getLogger(__name__)

# Rows per Parquet row group: small enough that a reader looking for one chunk's ids (by range, the shard's
# tables are sorted by doc_id) skips most of a large shard's file.
ROW_GROUP_ROWS = 8192
UNPARTITIONED = "all"
POINTER = "CURRENT"  # in a versioned folder: the name of the version readers use
SCRATCH_DIR = ".scratch"
STALE_AFTER_S = 24 * 3600.0  # leftovers whose owner cannot be checked (another host, older names): swept after
_SAFE_KEY = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._=-]{0,199}$")
_VERSION = re.compile(r"^v-[A-Za-z0-9._=-]{1,200}$")
_HOST = hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]
_LEFTOVER = re.compile(r"^\.tmp-(\d+)@([0-9a-f]{8})\.")
# Names used before owners were recorded (mkstemp/mkdtemp suffixes): temporary files, staged and replaced folders.
_LEGACY_FILE = re.compile(r"^\.[^.].*\.[a-z0-9_]{8}\.tmp$")
_LEGACY_DIR = re.compile(r"^\.[^.].*\.([a-z0-9_]{8}|old)$")


def _temp_prefix(name: str) -> str:
    """The start of a temporary name: its owner (pid, host) lets a sweep tell a dead writer's file from a live one's."""
    return f".tmp-{os.getpid()}@{_HOST}.{name}."


@functools.cache
def _umask() -> int:
    """The process umask, read once: from /proc on Linux (setting it to read it races with other threads)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _fsync(path: str | Path) -> None:
    """Flush a file's data, or a folder's entries (a rename just made in it), to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as e:
        if e.errno not in (errno.EINVAL, errno.ENOTSUP):  # some filesystems cannot fsync a folder
            raise
    finally:
        os.close(fd)


def _seal(tmp: str | Path) -> None:
    """Make a finished temporary file publishable: the mode open() would give it (mkstemp makes 0600), on disk."""
    os.chmod(tmp, 0o666 & ~_umask())
    _fsync(tmp)


def _temp_file(target: Path) -> str:
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=_temp_prefix(target.name), suffix=".tmp", dir=target.parent)
    os.close(fd)
    return tmp


@contextmanager
def _atomic_file(target: Path) -> Iterator[str]:
    """A temporary path beside `target`, renamed onto it when the block succeeds and removed when it fails."""
    tmp = _temp_file(target)
    try:
        yield tmp
        _seal(tmp)
        os.replace(tmp, target)
        _fsync(target.parent)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """An exclusive advisory lock (flock) on `path`, held for the block: one writer per machine at a time."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _process(pid: int) -> tuple[str, float] | None:
    """(state, start time) of a process from Linux /proc; None where /proc cannot tell."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        btime = next(float(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines()
                     if line.startswith("btime "))
        return fields[0], btime + int(fields[19]) / os.sysconf("SC_CLK_TCK")
    except (OSError, StopIteration, IndexError, ValueError):
        return None


def _abandoned(entry: os.DirEntry[str], in_scratch: bool, stale_after_s: float) -> bool:
    """Whether a temporary file or folder's writer is gone: on this host its process is dead (or a zombie, or
    its pid now belongs to a process started after the leftover was last written); for another host's, or a
    name from before owners were recorded, it has not changed for `stale_after_s`."""
    m = _LEFTOVER.match(entry.name)
    legacy = (_LEGACY_DIR if entry.is_dir(follow_symlinks=False) else _LEGACY_FILE).match(entry.name)
    if m is None and not (in_scratch or legacy):
        return False
    mtime = entry.stat(follow_symlinks=False).st_mtime
    if m is None or m[2] != _HOST:
        return time.time() - mtime > stale_after_s
    pid = int(m[1])
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        pass  # alive, another user's
    proc = _process(pid)
    return proc is not None and (proc[0] == "Z" or mtime < proc[1] - 2)  # 2 s: /proc's boot time is whole seconds


def sweep_leftovers(root: str | os.PathLike[str], stale_after_s: float = STALE_AFTER_S, depth: int = 2) -> int:
    """Remove the temporary files and folders of writers that are gone (see `_abandoned`) from `root` and its
    folders down to `depth` levels (tables, quarantine tables, versioned folders, scratch). Returns the count."""
    swept, stack = 0, [(Path(root), 0)]
    while stack:
        folder, level = stack.pop()
        try:
            entries = list(os.scandir(folder))
        except OSError:
            continue  # missing or unreadable
        for e in entries:
            try:
                is_dir = e.is_dir(follow_symlinks=False)
                if (e.name.startswith(".") or folder.name == SCRATCH_DIR) and _abandoned(
                        e, folder.name == SCRATCH_DIR, stale_after_s):
                    shutil.rmtree(e.path, ignore_errors=True) if is_dir else os.unlink(e.path)
                    swept += 1
                elif is_dir and level < depth and not _LEFTOVER.match(e.name):
                    stack.append((Path(e.path), level + 1))
            except OSError:
                continue  # removed meanwhile (its owner finished, another sweep) or not ours to remove
    if swept:
        log.info("swept %d temporary file(s)/folder(s) left by dead writers under %s", swept, root)
    return swept


def read_pointer(folder: Path) -> str | None:
    """The version a versioned folder's pointer names (None: no pointer, an unversioned folder)."""
    try:
        version = (folder / POINTER).read_text().strip()
    except FileNotFoundError:
        return None
    if not _VERSION.match(version):
        raise ValueError(f"{folder / POINTER} names {version!r}, not a version folder")
    return version


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


def _cache_base() -> Path:
    """FINEINSTRUCTIONS_CACHE_DIR, else ~/.cache/fineinstructions: S3 working copies and input copies."""
    return Path(os.environ.get("FINEINSTRUCTIONS_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "fineinstructions"))


def default_working_copy(uri: str) -> Path:
    """Where an S3 root's working copy lives when FINEINSTRUCTIONS_CACHE_DIR is not set."""
    bucket, prefix = split_s3_uri(uri)
    return _cache_base() / "s3" / bucket / (prefix or "_root")


def make_s3_client(endpoint_url: str | None = None, region: str | None = None, max_attempts: int = 5) -> Any:
    """The platform's one S3 client (boto3) for tables, the index and inputs alike: standard retries; endpoint
    and region as given, else boto3's own environment (AWS_ENDPOINT_URL for MinIO or moto, AWS_REGION, the
    usual credential chain)."""
    import boto3
    from botocore.config import Config

    return boto3.client("s3", endpoint_url=endpoint_url or None, region_name=region or None,
                        config=Config(retries={"max_attempts": max_attempts, "mode": "standard"}))


@functools.lru_cache(maxsize=8)
def _shared_client(endpoint: str | None, region: str | None, key_id: str | None) -> Any:
    return make_s3_client(endpoint, region)


def default_s3_client() -> Any:
    """One client per process for the environment's endpoint, region and credentials (building a boto3 client
    costs tens of milliseconds: not once per input file)."""
    env = os.environ.get
    return _shared_client(env("AWS_ENDPOINT_URL"), env("AWS_REGION") or env("AWS_DEFAULT_REGION"),
                          env("AWS_ACCESS_KEY_ID"))


def list_s3_files(uri: str, client: Any = None) -> list[str]:
    """Every object under an `s3://bucket/prefix` "folder" (any depth), as s3:// URIs; FileNotFoundError naming
    the prefix when nothing is there (S3 has no folders: a prefix exists when an object lies under it)."""
    client = client or default_s3_client()
    bucket, prefix = split_s3_uri(uri)
    base = f"{prefix}/" if prefix else ""
    try:
        keys = [obj["Key"] for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=base)
                for obj in page.get("Contents", []) if not obj["Key"].endswith("/")]
    except client.exceptions.NoSuchBucket as e:
        raise FileNotFoundError(f"input folder {uri} does not exist (no bucket {bucket!r})") from e
    if not keys and base:
        raise FileNotFoundError(f"input folder {uri} does not exist")
    return sorted(f"s3://{bucket}/{k}" for k in keys)


def local_copy(uri: str, client: Any = None) -> Path:
    """A local copy of an input object, downloaded once and again only when the object changed (its ETag):
    readers then stream and seek a local file (Parquet needs both) whatever the object's size. Under
    FINEINSTRUCTIONS_CACHE_DIR (or ~/.cache/fineinstructions)/inputs/<bucket>/<key>."""
    client = client or default_s3_client()
    bucket, key = split_s3_uri(uri)
    target = _cache_base() / "inputs" / bucket / key
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        etag = client.head_object(Bucket=bucket, Key=key)["ETag"]
    except client.exceptions.ClientError as e:
        raise FileNotFoundError(f"{uri}: no such object ({e.response.get('Error', {}).get('Code')})") from e
    tag = target.with_name(f".{target.name}.etag")
    with file_lock(target.with_name(f".{target.name}.lock")):  # one download per object however many readers
        if not (target.exists() and tag.exists() and tag.read_text() == etag):
            with _atomic_file(target) as tmp:
                client.download_file(bucket, key, tmp)
            tag.write_text(etag)
    return target


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
        with file_lock(self.local / ".s3-sync.lock"):
            yield

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

    def subfolders(self, rel_folder: str) -> set[str]:
        """Names of the folders directly under a folder (prefixes one level down)."""
        prefix = self.key(rel_folder).rstrip("/") + "/"
        return {p["Prefix"][len(prefix):].strip("/")
                for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix,
                                                                                  Delimiter="/")
                for p in page.get("CommonPrefixes", [])}

    def delete_tree(self, rel_folder: str) -> None:
        """Delete every object under a folder."""
        prefix = self.key(rel_folder).rstrip("/") + "/"
        for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix):
            for obj in page.get("Contents", []):
                self.client.delete_object(Bucket=self.bucket, Key=obj["Key"])

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
        `staged_dir` uploads each version to a new folder that readers reach only through the pointer uploaded
        after it; `last` (meta.json) still makes a half-uploaded folder fail the index's meta check."""
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
                 working_copy: str | os.PathLike[str] | None = None, stale_after_s: float = STALE_AFTER_S):
        root = str(root)
        self.uri = root
        self.mirror: S3Mirror | None = None
        if root.startswith("s3://"):
            local = Path(working_copy) if working_copy else default_working_copy(root)
            self.root = local.resolve()
            if s3_client is None:
                s3_client = make_s3_client()
            self.mirror = S3Mirror(root, self.root, s3_client)
        else:
            self.root = Path(root).resolve()
            self.uri = str(self.root)
        self.stale_after_s = stale_after_s
        self.swept = sweep_leftovers(self.root, stale_after_s)  # what runs killed midway left behind

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

    def _lock(self, folder: Path) -> Any:
        """Serialises publishers of a versioned folder (with an S3 root: of the working copy)."""
        return self.mirror.lock() if self.mirror is not None else file_lock(folder / ".publish.lock")

    @contextmanager
    def _published(self, target: Path, locked: bool = False) -> Iterator[str]:
        """A temporary path for the new version of `target`. Locally it is renamed into place when the block
        succeeds; with an S3 root it is uploaded first and renamed only once the bucket holds it, so a failed
        upload leaves both the bucket and the working copy at the previous version. `locked`: the caller
        already holds the working copy's lock."""
        if self.mirror is None:
            with _atomic_file(target) as tmp:
                yield tmp
            return
        tmp = _temp_file(target)
        try:
            yield tmp
            _seal(tmp)
            with self.mirror.lock() if not locked else nullcontext():
                etag = self.mirror.upload(tmp, target)
                os.replace(tmp, target)
                _fsync(target.parent)
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

    def write_jsonl_from(self, table: str, partition: str = UNPARTITIONED) -> Path:
        """The partition as JSON Lines beside its Parquet file, streamed from that file, atomically."""
        source = self.path(table, partition)
        target = source.with_suffix(".jsonl")
        with self._published(target) as tmp:
            pl.scan_parquet(source).sink_ndjson(tmp)
        return target

    def write_json(self, name: str, obj: Any) -> Path:
        """A small JSON document (e.g. the dataset report) at `<root>/<name>`, atomically."""
        target = self.root / name
        with self._published(target) as tmp:
            Path(tmp).write_text(json.dumps(obj, indent=2))
        return target

    def dir(self, name: str) -> Path:
        """A folder of files kept together, brought up to date first; for a versioned folder (`staged_dir`, e.g.
        the template index) the version its pointer names."""
        folder = self.root / name
        self._sync_folder(folder)
        version = read_pointer(folder)
        if version is None:
            return folder
        if self.mirror is not None:
            with self.mirror.lock():
                self.mirror.pull_folder(folder / version)
                live = self.mirror.subfolders(folder.relative_to(self.root).as_posix())
                for d in folder.iterdir():  # versions the bucket no longer holds leave the working copy too
                    if d.is_dir() and _VERSION.match(d.name) and d.name not in live:
                        shutil.rmtree(d, ignore_errors=True)
        return folder / version

    def write(
        self, table: str, df: pl.DataFrame, partition: str = UNPARTITIONED, quarantine: bool = False
    ) -> Path:
        target = self.path(table, partition, quarantine)
        with self._published(target) as tmp:
            df.write_parquet(tmp, compression="zstd", statistics=True, row_group_size=ROW_GROUP_ROWS)
        return target

    def exists(self, table: str, partition: str = UNPARTITIONED, quarantine: bool = False) -> bool:
        p = self.path(table, partition, quarantine)
        if self.mirror is not None:
            with self.mirror.lock():
                self.mirror.pull_one(p)
        return p.exists()

    def file(self, table: str, partition: str = UNPARTITIONED, quarantine: bool = False) -> Path:
        """The partition's local file, brought up to date, for a reader that scans it lazily or in chunks."""
        p = self.path(table, partition, quarantine)
        if not self.exists(table, partition, quarantine):
            kind = "quarantine table" if quarantine else "table"
            raise FileNotFoundError(
                f"{kind} {table!r} partition {partition!r} is not materialized yet (expected "
                f"{self.uri_of(p)})"
            )
        return p

    def read(self, table: str, partition: str = UNPARTITIONED, quarantine: bool = False) -> pl.DataFrame:
        return pl.read_parquet(self.file(table, partition, quarantine))

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

    def read_json(self, name: str) -> Any | None:
        """A small JSON document at `<root>/<name>` (brought up to date first), or None if there is none."""
        target = self.root / name
        if self.mirror is not None:
            with self.mirror.lock():
                self.mirror.pull_one(target)
        return json.loads(target.read_text()) if target.exists() else None

    def remove_dir(self, name: str) -> None:
        """Delete a folder of the root (and, with an S3 root, its objects in the bucket)."""
        if self.mirror is not None:
            with self.mirror.lock():
                self.mirror.delete_tree(name)
        shutil.rmtree(self.root / name, ignore_errors=True)

    @contextmanager
    def publish(self, table: str, partition: str = UNPARTITIONED, quarantine: bool = False) -> Iterator[str]:
        """A temporary path for a writer that produces the partition's file itself (e.g. DuckDB's COPY); the
        file becomes the partition, atomically, when the block succeeds (and is uploaded with an S3 root)."""
        with self._published(self.path(table, partition, quarantine)) as tmp:
            yield tmp

    def write_parts(self, table: str, parts: list[Path], empty: pl.DataFrame, partition: str = UNPARTITIONED,
                    quarantine: bool = False,
                    transform: Callable[[pl.LazyFrame], pl.LazyFrame] | None = None) -> Path:
        """Stream part files (written batch by batch) into one partition file, atomically; `transform`: applied to
        the parts' rows on the way (e.g. rows moved by a shard-level rule)."""
        target = self.path(table, partition, quarantine)
        with self._published(target) as tmp:
            if parts:
                rows = pl.scan_parquet(parts)
                (transform(rows) if transform else rows).sink_parquet(tmp, compression="zstd",
                                                                      row_group_size=ROW_GROUP_ROWS)
            else:
                empty.write_parquet(tmp, compression="zstd")
        return target

    @contextmanager
    def scratch(self, name: str) -> Iterator[Path]:
        """A private folder for one run's intermediate files, removed afterwards whatever happens (and, if the
        process is killed, by the next sweep: this one sweeps the scratch folders of dead runs first)."""
        base = self.root / SCRATCH_DIR
        base.mkdir(parents=True, exist_ok=True)
        sweep_leftovers(base, self.stale_after_s, depth=0)
        tmp = Path(tempfile.mkdtemp(prefix=_temp_prefix(name), dir=base))
        try:
            yield tmp
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    @contextmanager
    def staged_dir(self, name: str, label: str = "") -> Iterator[Path]:
        """Build a folder of files kept together (e.g. an index and its id map) aside, then publish it whole:
        it becomes the version `<name>/v-<UTC time>[-<label>]/` and the pointer `<name>/CURRENT` is switched to
        it in one rename (`dir(name)` follows the pointer). Afterwards versions older than the one replaced are
        removed; the replaced one stays for readers that resolved the pointer just before the switch, newer
        ones may be another publisher's. With an S3 root the version is uploaded first (meta.json last), the
        pointer after it, and the working copy switched only once the bucket holds both."""
        folder = self.root / name
        folder.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=_temp_prefix("staged"), dir=folder))
        try:
            yield tmp
            stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S%fZ")  # fixed width: names sort by age
            version = f"v-{stamp}-{label}" if label else f"v-{stamp}"
            if not _VERSION.match(version):
                raise ValueError(f"version label {label!r} is not a safe folder name")
            for f in tmp.rglob("*"):
                if f.is_file():
                    _fsync(f)
            os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700
            _fsync(tmp)
            with self._lock(folder):
                if self.mirror is not None:
                    self.mirror.pull_one(folder / POINTER)
                previous = read_pointer(folder)
                etags = self.mirror.upload_folder(tmp, folder / version) if self.mirror is not None else {}
                os.rename(tmp, folder / version)
                _fsync(folder)
                if self.mirror is not None:
                    self.mirror._save_state(folder / version, etags)
                with self._published(folder / POINTER, locked=True) as ptr:
                    Path(ptr).write_text(version + "\n")
                self._prune_versions(folder, version, previous)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise

    def _prune_versions(self, folder: Path, current: str, previous: str | None) -> None:
        """Remove versions older than `previous` and the files of the unversioned layout (before versions)."""
        def old(v: str) -> bool:
            return v != current and previous is not None and v < previous

        rel = folder.relative_to(self.root).as_posix()
        if self.mirror is not None:
            for v in self.mirror.subfolders(rel):
                if _VERSION.match(v) and old(v):
                    self.mirror.delete_tree(f"{rel}/{v}")
            for f in self.mirror._remote(rel):
                if f != POINTER and not f.startswith("."):
                    self.mirror.client.delete_object(Bucket=self.mirror.bucket, Key=self.mirror.key(f"{rel}/{f}"))
        for p in folder.iterdir():
            if p.is_dir() and _VERSION.match(p.name) and old(p.name):
                shutil.rmtree(p, ignore_errors=True)
            elif p.is_file() and p.name != POINTER and not p.name.startswith("."):
                p.unlink(missing_ok=True)
