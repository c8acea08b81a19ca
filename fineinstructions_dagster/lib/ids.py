"""Content-addressed ids: a hash of what defines a row, so re-runs reproduce the same ids."""

from __future__ import annotations

import hashlib
import json
from typing import Any

import polars as pl

ID_HEX_CHARS = 16  # 64 bits: collision odds stay negligible up to billions of rows per id kind.


def content_id(kind: str, *parts: Any) -> str:
    """Stable id for one row: `kind` namespaces the id so that a doc and a query never share one."""
    payload = json.dumps([kind, *parts], sort_keys=True, ensure_ascii=False, default=str)
    return kind[:1] + hashlib.sha256(payload.encode("utf-8")).hexdigest()[:ID_HEX_CHARS]


def content_id_expr(kind: str, *columns: str) -> pl.Expr:
    """The same idea vectorised in Polars, for stages that id millions of rows at once.

    Polars' own `hash` is not stable across versions, so we hash a canonical string with sha256 in
    a batched `map_batches` (one Python call per batch, not per row).
    """

    def _hash(s: pl.Series) -> pl.Series:
        return pl.Series(
            [kind[:1] + hashlib.sha256(v.encode("utf-8")).hexdigest()[:ID_HEX_CHARS] for v in s.to_list()],
            dtype=pl.String,
        )

    joined = pl.concat_str(
        [pl.lit(kind), *[pl.col(c).cast(pl.String).fill_null("\x00") for c in columns]], separator="\x1f"
    )
    return joined.map_batches(_hash, return_dtype=pl.String)


def text_fingerprint(text: str) -> str:
    """Hash of whitespace/case-normalised text, used for exact dedup."""
    norm = " ".join(text.lower().split())
    return hashlib.sha256(norm.encode("utf-8")).hexdigest()[:ID_HEX_CHARS]
