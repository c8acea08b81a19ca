"""Stages 3-4: the template index (embedded compatible-document descriptions in usearch) and
matching documents to templates by embedding retrieval.

Today documents are embedded with the model's own pooling (mean pooling for MiniLM), one vector per
document (pooled chunk `global`); usearch returns the top-k templates per document.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl
from usearch.index import Index

from fineinstructions_dagster.lib.ids import content_id
from fineinstructions_dagster.lib.stats import StageStats
from fineinstructions_dagster.stages.embedding import Embedder

INDEX_FILE = "templates.usearch"
ID_MAP_FILE = "id_map.parquet"
META_FILE = "meta.json"
MATCH_COLUMNS = ["match_id", "doc_id", "template_id", "shard", "chunk", "score", "rank", "index_id", "run_id"]


class StaleIndexError(RuntimeError):
    """The index on disk was built from another bank or embedder than the one in use."""


def bank_hash(bank: pl.DataFrame) -> str:
    h = hashlib.sha256()
    for tid, desc in bank.select("template_id", "compatible_document_description").sort("template_id").iter_rows():
        h.update(f"{tid}\x1f{desc}\x1e".encode())
    return h.hexdigest()[:16]


@dataclass
class TemplateIndexMeta:
    index_id: str
    embedder: str
    dim: int
    n_templates: int
    bank_hash: str
    metric: str = "cos"
    dtype: str = "f32"


def build_template_index(bank: pl.DataFrame, embedder: Embedder, out_dir: Path,
                         batch_size: int = 4096) -> TemplateIndexMeta:
    """Embed every template's compatible document description (in batches) into a usearch index,
    saved beside its id map (usearch key -> template_id) and a meta file that pins bank and model."""
    if bank.height == 0:
        raise ValueError("cannot build a template index from an empty template bank")
    bank = bank.sort("template_id")
    index = Index(ndim=embedder.dim, metric="cos", dtype="f32")
    descriptions = bank["compatible_document_description"].to_list()
    for start in range(0, len(descriptions), batch_size):
        vecs = embedder.encode(descriptions[start:start + batch_size])
        index.add(np.arange(start, start + len(vecs), dtype=np.uint64), vecs)
    bh = bank_hash(bank)
    meta = TemplateIndexMeta(index_id=content_id("index", embedder.name, bh), embedder=embedder.name,
                             dim=embedder.dim, n_templates=bank.height, bank_hash=bh)
    index.save(str(out_dir / INDEX_FILE))
    bank.select(pl.int_range(0, bank.height, dtype=pl.UInt64).alias("key"), "template_id").write_parquet(
        out_dir / ID_MAP_FILE)
    (out_dir / META_FILE).write_text(json.dumps(meta.__dict__, indent=2))
    return meta


@dataclass
class TemplateIndex:
    index: Index
    template_ids: np.ndarray
    meta: TemplateIndexMeta


def open_template_index(folder: Path, embedder: Embedder, bank: pl.DataFrame | None = None) -> TemplateIndex:
    """Open the saved index memory-mapped; refuse one built for another embedder or bank."""
    meta_path = folder / META_FILE
    if not meta_path.exists():
        raise FileNotFoundError(f"no template index at {folder} (materialize template_index first)")
    meta = TemplateIndexMeta(**json.loads(meta_path.read_text()))
    if meta.embedder != embedder.name:
        raise StaleIndexError(f"template index at {folder} was built with embedder {meta.embedder!r}, "
                              f"but matching uses {embedder.name!r}; re-materialize template_index")
    if bank is not None and bank_hash(bank) != meta.bank_hash:
        raise StaleIndexError(f"template index at {folder} is stale: the template bank changed since it was "
                              "built; re-materialize template_index")
    index = Index.restore(str(folder / INDEX_FILE), view=True)
    ids = pl.read_parquet(folder / ID_MAP_FILE).sort("key")["template_id"].to_numpy()
    return TemplateIndex(index, ids, meta)


def match_documents(docs: pl.DataFrame, tindex: TemplateIndex, embedder: Embedder, k: int,
                    min_score: float = 0.0, run_id: str = "") -> tuple[pl.DataFrame, StageStats]:
    """Top-k templates per document. Stats count documents; `matches` counts rows."""
    stats = StageStats(total=docs.height)
    if docs.height == 0:
        return pl.DataFrame(schema={c: pl.String for c in MATCH_COLUMNS}), stats
    vecs = embedder.encode(docs["text"].to_list())
    k_eff = min(k, len(tindex.template_ids))
    found = tindex.index.search(vecs, k_eff)
    keys = np.asarray(found.keys).reshape(len(vecs), -1)
    dists = np.asarray(found.distances).reshape(len(vecs), -1)
    counts = np.asarray(found.counts).reshape(-1)
    rows = []
    doc_ids = docs["doc_id"].to_list()
    shard = docs["shard"].to_list()
    for i, doc_id in enumerate(doc_ids):
        n = 0
        for j in range(int(counts[i])):
            score = float(1.0 - dists[i, j])
            if score < min_score:
                continue
            tid = str(tindex.template_ids[int(keys[i, j])])
            n += 1
            rows.append({"match_id": content_id("match", doc_id, tid, "global", tindex.meta.index_id),
                         "doc_id": doc_id, "template_id": tid, "shard": shard[i], "chunk": "global",
                         "score": score, "rank": n, "index_id": tindex.meta.index_id, "run_id": run_id})
        if n == 0:
            stats.drop("no_template_above_min_score")
    stats.kept = docs.height - stats.dropped_total
    stats.extra["matches"] = len(rows)
    stats.check_balanced()
    df = pl.DataFrame(rows, schema_overrides={"score": pl.Float32, "rank": pl.Int32}) if rows else \
        pl.DataFrame(schema={c: pl.String for c in MATCH_COLUMNS})
    return df, stats
