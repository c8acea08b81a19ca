"""Stages 3-4: the template index (compatible-document descriptions embedded into usearch) and matching
documents to templates by embedding retrieval with Gaussian coverage pooling.

Matching, per shard: every pooled vector of a document (global mean + N coverage chunks) queries the index;
candidates are merged per (document, template) keeping the best-scoring chunk; a hubness correction
(CSLS, Conneau et al. 2018: subtract a share of the template's mean top-score over the shard) keeps a few
generic templates from being every document's match; then k templates per document are chosen greedily by
maximal marginal relevance, so they are not k near-identical templates. Everything is vectorised over
batches of documents; docs are taken in doc_id order, so a re-run reproduces the shard's matches exactly.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import polars as pl
from usearch.index import Index

from fineinstructions_dagster.lib.ids import content_id, content_id_expr
from fineinstructions_dagster.lib.stats import StageStats
from fineinstructions_dagster.stages.embedding import Embedder
from fineinstructions_dagster.stages.pooling import CoveragePoolingConfig

INDEX_FILE = "templates.usearch"
ID_MAP_FILE = "id_map.parquet"
META_FILE = "meta.json"
MATCH_SCHEMA = {
    "match_id": pl.String(), "doc_id": pl.String(), "template_id": pl.String(), "shard": pl.String(),
    "chunk": pl.String(), "chunk_position": pl.Float32(), "score": pl.Float32(), "selection_score": pl.Float32(),
    "rank": pl.Int32(), "index_id": pl.String(), "pooling": pl.String(), "run_id": pl.String(),
}
MATCH_COLUMNS = list(MATCH_SCHEMA)
NO_MATCH = "no_template_above_min_score"
UNMATCHED_SCHEMA = {"doc_id": pl.String(), "shard": pl.String(), "reason": pl.String()}


class StaleIndexError(RuntimeError):
    """The index on disk was built from another bank or embedder than the one in use."""


@dataclass(frozen=True)
class IndexConfig:
    """usearch HNSW settings. f16 halves memory against f32; i8 saves another 40% but its quantisation caps
    recall@10 near 0.87 on 1M text-like vectors (see `make bench-matching`)."""

    metric: str = "cos"
    dtype: str = "f16"
    connectivity: int = 16
    expansion_add: int = 64  # half usearch's default: builds ~2x faster, recall regained by expansion_search
    expansion_search: int = 256  # recall@10 0.97 on 1M text-like vectors at ~71x exact search (bench-matching)

    def __post_init__(self) -> None:
        # Scores are cosine similarities (1 - distance); l2sq distances are not, so it is not offered.
        if self.metric not in ("cos", "ip"):
            raise ValueError(f"index metric must be cos or ip, got {self.metric!r}")
        if self.dtype not in ("f32", "f16", "bf16", "i8"):
            raise ValueError(f"index dtype must be f32, f16, bf16 or i8, got {self.dtype!r}")
        if self.connectivity < 2 or self.expansion_add < 1 or self.expansion_search < 1:
            raise ValueError(f"index connectivity/expansion invalid: {self}")

    def new_index(self, dim: int) -> Index:
        return Index(ndim=dim, metric=self.metric, dtype=self.dtype, connectivity=self.connectivity,
                     expansion_add=self.expansion_add, expansion_search=self.expansion_search)


@dataclass(frozen=True)
class MatchConfig:
    k: int = 5  # templates per document
    min_score: float = 0.0  # cosine below which a candidate is not used
    candidates_per_vector: int = 16  # neighbours fetched per pooled vector
    max_candidates: int = 32  # per document, after merging its vectors' neighbours
    hubness: float = 0.5  # weight of the template's shard-wide mean top score (0.5 = CSLS ranking)
    hub_k: int = 10  # how many of a template's best scores in the shard make its hubness
    diversity: float = 0.2  # MMR: penalty per unit of similarity to a template already chosen for the doc
    batch_docs: int = 512
    pooling: CoveragePoolingConfig = field(default_factory=CoveragePoolingConfig)

    def __post_init__(self) -> None:
        if self.k < 1 or self.candidates_per_vector < 1 or self.max_candidates < self.k:
            raise ValueError(f"need k >= 1, candidates_per_vector >= 1, max_candidates >= k: {self}")
        if self.hubness < 0 or self.diversity < 0:
            raise ValueError("hubness and diversity must be >= 0")
        if self.hub_k < 1 or self.batch_docs < 1:
            raise ValueError(f"hub_k and batch_docs must be >= 1: {self}")

    def describe(self) -> str:
        return (f"{self.pooling.describe()};k={self.k};cand={self.candidates_per_vector}/{self.max_candidates};"
                f"hub={self.hubness:g}@{self.hub_k};div={self.diversity:g};min={self.min_score:g}")


def bank_hash(bank: pl.DataFrame) -> str:
    h = hashlib.sha256()
    for tid, desc in bank.select("template_id", "compatible_document_description").sort("template_id").iter_rows():
        h.update(f"{tid}\x1f{desc}\x1e".encode())
    return h.hexdigest()[:16]


@dataclass
class TemplateIndexMeta:
    index_id: str
    embedder: str
    embedder_revision: str
    dim: int
    n_templates: int
    bank_hash: str
    metric: str
    dtype: str
    connectivity: int
    expansion_add: int
    expansion_search: int
    next_key: int
    build: str = "full"  # or "incremental"; "unchanged" (reported, never saved) when a re-run had nothing to do
    added: int = 0
    removed: int = 0
    parent_index_id: str = ""

    def config(self) -> IndexConfig:
        return IndexConfig(self.metric, self.dtype, self.connectivity, self.expansion_add, self.expansion_search)


def read_index_meta(folder: Path) -> TemplateIndexMeta | None:
    """None where there is no index; StaleIndexError for a meta file this version cannot read (an index
    written by an older version of the pipeline, or a damaged file)."""
    p = Path(folder) / META_FILE
    if not p.exists():
        return None
    try:
        return TemplateIndexMeta(**json.loads(p.read_text()))
    except (TypeError, ValueError) as e:
        raise StaleIndexError(f"template index meta {p} is from another version or damaged ({e}); "
                              "re-materialize template_index") from e


def template_index_id(bank: pl.DataFrame, embedder: Embedder, cfg: IndexConfig | None = None) -> str:
    """The id of the index of this bank with this embedder and these settings (the same for any build of it)."""
    return _index_id(embedder, bank_hash(bank), cfg or IndexConfig())


def _index_id(embedder: Embedder, bh: str, cfg: IndexConfig) -> str:
    return content_id("index", embedder.name, embedder.revision, bh, *map(str, asdict(cfg).values()))


def unchanged_template_index(previous: Path | None, index_id: str) -> TemplateIndexMeta | None:
    """The meta of the index in `previous` (marked `build: unchanged`, its parent kept) when it already is the
    complete index `index_id`: a re-run with nothing to add or remove, which need not rebuild or republish."""
    try:
        old = read_index_meta(previous) if previous is not None else None
    except StaleIndexError:
        return None
    if old is None or old.index_id != index_id or not (previous / ID_MAP_FILE).exists():
        return None
    index = Index.restore(str(previous / INDEX_FILE), view=True) if (previous / INDEX_FILE).exists() else None
    if index is None or len(index) != old.n_templates:
        return None  # damaged: rebuild
    return replace(old, build="unchanged", added=0, removed=0)


def _embed_into(index: Index, texts: list[str], keys: np.ndarray, embedder: Embedder, batch_size: int) -> None:
    for start in range(0, len(texts), batch_size):
        vecs = embedder.encode(texts[start:start + batch_size])
        index.add(keys[start:start + len(vecs)], vecs)


def build_template_index(bank: pl.DataFrame, embedder: Embedder, out_dir: Path, cfg: IndexConfig | None = None,
                         previous: Path | None = None, batch_size: int = 4096) -> TemplateIndexMeta:
    """Embed every template's compatible document description (in batches) into a usearch index saved in
    `out_dir` beside its id map (key -> template_id, description hash) and a meta file pinning the embedder
    (name and revision), the bank hash and the index settings.

    With `previous` (the folder of the current index): when the embedder and settings are unchanged, only
    templates that are new (or whose description changed) are embedded and added, and templates no longer in
    the bank are removed; everything else is copied. Otherwise the index is built from scratch."""
    cfg = cfg or IndexConfig()
    if bank.height == 0:
        raise ValueError("cannot build a template index from an empty template bank "
                         "(no template passed validation; see the templates quarantine)")
    out_dir = Path(out_dir)
    bank = bank.sort("template_id").with_columns(
        content_id_expr("description", "compatible_document_description").alias("desc_hash"))
    bh = bank_hash(bank)
    try:
        old = read_index_meta(previous) if previous is not None else None
    except StaleIndexError:
        old = None  # unreadable: build from scratch
    reusable = (old is not None and old.embedder == embedder.name and old.embedder_revision == embedder.revision
                and old.dim == embedder.dim and old.config() == cfg and (previous / INDEX_FILE).exists())
    removed = 0
    if reusable:
        assert previous is not None and old is not None
        index = Index.restore(str(previous / INDEX_FILE))  # loaded into memory: a view cannot be modified
        id_map = pl.read_parquet(previous / ID_MAP_FILE)
        current = id_map.join(bank.select("template_id", "desc_hash"), on=["template_id", "desc_hash"], how="semi")
        gone = id_map.join(current, on="key", how="anti")
        if gone.height:
            index.remove(gone["key"].to_numpy())
            removed = gone.height
        new = bank.join(current, on=["template_id", "desc_hash"], how="anti")
        keys = np.arange(old.next_key, old.next_key + new.height, dtype=np.uint64)
        id_map = pl.concat([current, new.select(pl.Series("key", keys), "template_id", "desc_hash")])
        next_key = old.next_key + new.height
    else:
        index = cfg.new_index(embedder.dim)
        new = bank
        keys = np.arange(0, bank.height, dtype=np.uint64)
        id_map = bank.select(pl.Series("key", keys), "template_id", "desc_hash")
        next_key = bank.height
    _embed_into(index, new["compatible_document_description"].to_list(), keys, embedder, batch_size)
    index_id = _index_id(embedder, bh, cfg)
    parent = ""
    if reusable and old is not None:  # an update of the same index (nothing changed) keeps its parent, never itself
        parent = old.index_id if old.index_id != index_id else old.parent_index_id
    meta = TemplateIndexMeta(
        index_id=index_id, embedder=embedder.name, embedder_revision=embedder.revision, dim=embedder.dim,
        n_templates=bank.height, bank_hash=bh, **asdict(cfg), next_key=next_key,
        build="incremental" if reusable else "full", added=new.height, removed=removed, parent_index_id=parent)
    index.save(str(out_dir / INDEX_FILE))
    id_map.sort("key").write_parquet(out_dir / ID_MAP_FILE)
    (out_dir / META_FILE).write_text(json.dumps(asdict(meta), indent=2))
    return meta


@dataclass
class TemplateIndex:
    index: Index
    keys: np.ndarray  # sorted usearch keys
    template_ids: np.ndarray  # template_id of keys[i]
    meta: TemplateIndexMeta

    def ids_for(self, keys: np.ndarray) -> np.ndarray:
        return self.template_ids[np.searchsorted(self.keys, keys)]


def open_template_index(folder: Path, embedder: Embedder, bank: pl.DataFrame | None = None) -> TemplateIndex:
    """Open the saved index memory-mapped (usearch `view`); refuse one built for another embedder (name or
    revision) or another bank than the one given."""
    folder = Path(folder)
    meta = read_index_meta(folder)
    if meta is None:
        raise FileNotFoundError(f"no template index at {folder} (materialize template_index first)")
    if (meta.embedder, meta.embedder_revision) != (embedder.name, embedder.revision):
        raise StaleIndexError(
            f"template index at {folder} was built with embedder {meta.embedder}@{meta.embedder_revision}, but "
            f"matching uses {embedder.name}@{embedder.revision}; re-materialize template_index")
    if bank is not None and bank_hash(bank) != meta.bank_hash:
        raise StaleIndexError(f"template index at {folder} is stale: the template bank changed since it was "
                              "built; re-materialize template_index")
    index = Index.restore(str(folder / INDEX_FILE), view=True)
    if index is None or len(index) != meta.n_templates:
        raise StaleIndexError(f"template index file at {folder} is missing or does not hold "
                              f"{meta.n_templates} templates; re-materialize template_index")
    index.expansion_search = meta.expansion_search
    id_map = pl.read_parquet(folder / ID_MAP_FILE).sort("key")
    return TemplateIndex(index, id_map["key"].to_numpy(), id_map["template_id"].to_numpy(), meta)


def search_batch(index: Index, queries: np.ndarray, count: int, **kw: object) -> tuple[np.ndarray, ...]:
    """usearch search as [Q, count] keys and distances plus [Q] counts, also for a single query."""
    found = index.search(queries, count, **kw)
    keys = np.asarray(found.keys).reshape(len(queries), -1)
    dists = np.asarray(found.distances).reshape(len(queries), -1)
    counts = np.asarray(getattr(found, "counts", [len(found.keys)])).reshape(-1)
    return keys, dists, counts


def _candidates(vecs: np.ndarray, doc_offset: int, tindex: TemplateIndex, cfg: MatchConfig) -> pl.DataFrame:
    """Search every pooled vector; one row per (document, template) with the best chunk's cosine."""
    n_docs, n_vec, dim = vecs.shape
    keys, dists, counts = search_batch(tindex.index, vecs.reshape(-1, dim),
                                       min(cfg.candidates_per_vector, tindex.meta.n_templates))
    valid = np.arange(keys.shape[1])[None, :] < counts[:, None]
    rows = np.nonzero(valid)
    score = 1.0 - dists[rows]  # usearch: cos and ip distances are both 1 - similarity
    return (
        pl.DataFrame({"doc": (rows[0] // n_vec + doc_offset).astype(np.int64),
                      "chunk_idx": (rows[0] % n_vec).astype(np.int16),
                      "key": keys[rows].astype(np.uint64), "score": score.astype(np.float32)})
        .filter(pl.col("score") >= cfg.min_score)
        # Best chunk per template; ties go to the lower chunk index (global first) for determinism.
        .sort("doc", "key", "score", "chunk_idx", descending=[False, False, True, False])
        .unique(["doc", "key"], keep="first", maintain_order=True)
        .sort("doc", "score", "key", descending=[False, True, False])
        .filter(pl.int_range(pl.len()).over("doc") < cfg.max_candidates)
    )


def _hub_scores(cands: pl.DataFrame, hub_k: int) -> pl.DataFrame:
    """Per template: the mean of its `hub_k` best scores over the shard's documents. A template that is a
    candidate of fewer documents has its missing scores filled with the shard's lowest candidate score (they
    were below every document's cut-off), so a rarely matched template is not treated as a hub."""
    floor = float(cands["score"].min())  # type: ignore[arg-type]
    return (cands.sort("score", descending=True).group_by("key")
            .agg(pl.col("score").head(hub_k).sum().alias("top"), pl.len().clip(upper_bound=hub_k).alias("n"))
            .select("key", ((pl.col("top") + (hub_k - pl.col("n")) * floor) / hub_k).alias("hub")))


def _select_diverse(cands: pl.DataFrame, tindex: TemplateIndex, cfg: MatchConfig) -> pl.DataFrame:
    """Greedy MMR per document, vectorised across documents: repeatedly take the candidate with the highest
    relevance minus `diversity` x (max cosine to a template already chosen for that document, floored at 0:
    a dissimilar template earns no bonus)."""
    if cands.height == 0:
        return cands.with_columns(pl.lit(0, pl.Int32).alias("rank"))
    cands = cands.sort("doc", "relevance", "key", descending=[False, True, False]).with_columns(
        pl.int_range(pl.len()).over("doc").alias("slot"))
    docs = cands["doc"].unique(maintain_order=True)
    row_of = pl.DataFrame({"doc": docs, "row": np.arange(len(docs))})
    cands = cands.join(row_of, on="doc", how="left")
    n, m = len(docs), int(cands["slot"].max()) + 1
    rel = np.full((n, m), -np.inf, dtype=np.float32)
    keys = np.zeros((n, m), dtype=np.uint64)
    r, s = cands["row"].to_numpy(), cands["slot"].to_numpy()
    rel[r, s] = cands["relevance"].to_numpy()
    keys[r, s] = cands["key"].to_numpy()
    chosen = np.full((n, cfg.k), -1, dtype=np.int64)
    if cfg.diversity > 0:
        uniq = np.unique(cands["key"].to_numpy())
        vecs = np.vstack(tindex.index.get(uniq, dtype=np.float32)).reshape(len(uniq), -1)
        vecs /= np.maximum(np.linalg.norm(vecs, axis=1, keepdims=True), 1e-12)
        cand_vecs = vecs[np.searchsorted(uniq, keys)]  # [n, m, D]
        sims = np.einsum("nid,njd->nij", cand_vecs, cand_vecs)  # [n, m, m]
    open_ = np.isfinite(rel)
    redundancy = np.zeros((n, m), dtype=np.float32)
    rows = np.arange(n)
    for step in range(cfg.k):
        score = np.where(open_, rel - cfg.diversity * redundancy, -np.inf)
        pick = score.argmax(axis=1)
        ok = np.isfinite(score[rows, pick])
        chosen[ok, step] = pick[ok]
        open_[rows[ok], pick[ok]] = False
        if cfg.diversity > 0:
            redundancy[ok] = np.maximum(redundancy[ok], sims[rows[ok], pick[ok]])
    picked = pl.DataFrame({"row": np.repeat(rows, cfg.k), "slot": chosen.reshape(-1),
                           "rank": np.tile(np.arange(1, cfg.k + 1, dtype=np.int32), n)}).filter(pl.col("slot") >= 0)
    return cands.join(picked, on=["row", "slot"], how="inner").sort("doc", "rank")


def match_documents(docs: pl.DataFrame, tindex: TemplateIndex, embedder: Embedder, cfg: MatchConfig | None = None,
                    run_id: str = "") -> tuple[pl.DataFrame, StageStats]:
    """k templates per document (see the module docstring). Stats count documents; `matches` counts rows."""
    cfg = cfg or MatchConfig()
    stats = StageStats(total=docs.height)
    if docs.height == 0:
        return pl.DataFrame(schema=MATCH_SCHEMA), stats
    docs = docs.sort("doc_id")
    texts = docs["text"].to_list()
    parts = []
    for start in range(0, len(texts), cfg.batch_docs):
        vecs = embedder.encode_documents(texts[start:start + cfg.batch_docs], cfg.pooling)
        parts.append(_candidates(vecs, start, tindex, cfg))
    cands = pl.concat(parts)
    if cfg.hubness > 0 and cands.height:
        cands = cands.join(_hub_scores(cands, cfg.hub_k), on="key", how="left").with_columns(
            (pl.col("score") - cfg.hubness * pl.col("hub")).alias("relevance"))
    else:
        cands = cands.with_columns(pl.col("score").alias("relevance"))
    # MMR holds [docs, candidates, D] vectors: bounded by taking documents a batch at a time.
    picked = pl.concat([_select_diverse(part, tindex, cfg) for part in
                        cands.with_columns((pl.col("doc") // cfg.batch_docs).alias("part"))
                        .partition_by("part", maintain_order=True, include_key=False)]) if cands.height else \
        _select_diverse(cands, tindex, cfg)
    doc_rows = docs.select(pl.int_range(pl.len(), dtype=pl.Int64).alias("doc"), "doc_id", "shard")
    chunks = pl.DataFrame({"chunk_idx": np.arange(cfg.pooling.n_vectors, dtype=np.int16),
                           "chunk": cfg.pooling.chunk_names(), "chunk_position": cfg.pooling.chunk_centres()},
                          schema_overrides={"chunk_position": pl.Float32})
    found = (
        picked.with_columns(pl.Series("template_id", tindex.ids_for(picked["key"].to_numpy()), dtype=pl.String))
        .join(doc_rows, on="doc", how="left").join(chunks, on="chunk_idx", how="left")
        .sort("doc", "rank")
        .with_columns(pl.col("relevance").alias("selection_score"), pl.lit(tindex.meta.index_id).alias("index_id"),
                      pl.lit(cfg.describe()).alias("pooling"), pl.lit(run_id).alias("run_id"))
        .with_columns(content_id_expr("match", "doc_id", "template_id", "chunk", "index_id", "pooling")
                      .alias("match_id"))
        .select(MATCH_COLUMNS)
        .cast(MATCH_SCHEMA)  # type: ignore[arg-type]
    )
    matched = found["doc_id"].n_unique() if found.height else 0
    if docs.height - matched:
        stats.drop(NO_MATCH, docs.height - matched)
    stats.kept = matched
    stats.extra.update(matches=found.height, **usage_summary(found))
    stats.check_balanced()
    return found, stats


def unmatched_documents(docs: pl.DataFrame, found: pl.DataFrame) -> pl.DataFrame:
    """The documents that got no template (quarantine rows with the reason `match_documents` counts)."""
    return (docs.filter(~pl.col("doc_id").is_in(found["doc_id"].implode()))
            .select("doc_id", "shard", pl.lit(NO_MATCH).alias("reason")).cast(UNMATCHED_SCHEMA))  # type: ignore[arg-type]


def match_problems(found: pl.DataFrame, k: int) -> list[str]:
    """Invariants of a shard's matches (an asset check): at most k per document, ranks 1..n without gaps,
    no template twice for one document, cosine scores in [-1, 1], unique match ids."""
    if found.height == 0:
        return []
    problems = []
    per_doc = found.group_by("doc_id").agg(pl.len().alias("n"), pl.col("rank").sort().alias("ranks"),
                                           pl.col("template_id").n_unique().alias("templates"))
    if per_doc.filter(pl.col("n") > k).height:
        problems.append(f"documents with more than k={k} matches")
    if per_doc.filter(pl.col("ranks") != pl.int_ranges(1, pl.col("n") + 1, dtype=pl.Int32)).height:
        problems.append("ranks are not 1..n within a document")
    if per_doc.filter(pl.col("templates") != pl.col("n")).height:
        problems.append("a template matched twice to one document")
    if found.filter(~pl.col("score").is_between(-1.001, 1.001)).height:
        problems.append("scores outside [-1, 1]")
    if found["match_id"].n_unique() != found.height:
        problems.append("duplicate match ids")
    return problems


def template_usage(found: pl.DataFrame) -> pl.DataFrame:
    """How often each template was chosen (and at which ranks), most used first."""
    if found.height == 0:
        return pl.DataFrame(schema={"template_id": pl.String, "uses": pl.UInt32, "share": pl.Float64,
                                    "top1": pl.UInt32})
    return (found.group_by("template_id")
            .agg(pl.len().alias("uses"), (pl.col("rank") == 1).sum().alias("top1"))
            .with_columns((pl.col("uses") / found.height).alias("share"))
            .sort(["uses", "template_id"], descending=[True, False])
            .select("template_id", "uses", "share", "top1"))


def template_usage_of(path: str | Path) -> pl.DataFrame:
    """`template_usage` of a partition's file, aggregated lazily (memory follows the templates, not the rows)."""
    scan = pl.scan_parquet(path).select("template_id", "rank")
    n = scan.select(pl.len()).collect().item()
    if n == 0:
        return template_usage(pl.DataFrame(schema={"template_id": pl.String, "rank": pl.Int32}))
    return (scan.group_by("template_id").agg(pl.len().alias("uses"), (pl.col("rank") == 1).sum().alias("top1"))
            .with_columns((pl.col("uses") / n).alias("share"))
            .sort(["uses", "template_id"], descending=[True, False])
            .select("template_id", "uses", "share", "top1").collect())


def usage_summary_of(usage: pl.DataFrame, path: str | Path) -> dict[str, float | int]:
    """`usage_summary` of a whole partition from its template usage and its file (read lazily)."""
    if usage.height == 0:
        return {"distinct_templates": 0, "top_template_share": 0.0, "chunk_match_share": 0.0}
    chunk_share = pl.scan_parquet(path).select((pl.col("chunk") != "global").mean()).collect().item()
    return {"distinct_templates": usage.height, "top_template_share": round(float(usage["share"][0]), 4),
            "chunk_match_share": round(float(chunk_share), 4)}


def usage_summary(found: pl.DataFrame) -> dict[str, float | int]:
    if found.height == 0:
        return {"distinct_templates": 0, "top_template_share": 0.0, "chunk_match_share": 0.0}
    usage = template_usage(found)
    return {"distinct_templates": usage.height, "top_template_share": round(float(usage["share"][0]), 4),
            "chunk_match_share": round(float((found["chunk"] != "global").mean()), 4)}
