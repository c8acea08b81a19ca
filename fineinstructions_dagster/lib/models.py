"""What pins a model's weights, for lineage and cache keys: never 'unpinned'."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

_SNAPSHOT = re.compile(r"/snapshots/([0-9a-f]{7,40})(/|$)")


def model_revision(name_or_path: str) -> str:
    """The Hub snapshot hash (from a cache path, or from the local Hub cache for a repo id), else a hash of
    the model folder's file names, sizes and first 64 KiB (changes when any file is added, removed, resized
    or rewritten at its start), else 'unknown' (a repo id not in the local cache)."""
    path = name_or_path
    if not Path(path).exists():
        try:
            from huggingface_hub import snapshot_download

            path = snapshot_download(name_or_path, local_files_only=True)
        except Exception:  # not cached (yet): the name is all we know
            return "unknown"
    m = _SNAPSHOT.search(str(path))
    if m:
        return m.group(1)
    root = Path(path)
    if not root.is_dir():
        return "unknown"
    h = hashlib.sha256()
    for f in sorted(p for p in root.rglob("*") if p.is_file()):
        h.update(f"{f.relative_to(root).as_posix()}\x1f{f.stat().st_size}\x1e".encode())
        with open(f, "rb") as fh:
            h.update(fh.read(65536))
    return h.hexdigest()[:12]
