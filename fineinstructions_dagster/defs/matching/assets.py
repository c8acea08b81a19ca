"""`template_index` (usearch over description embeddings) and `matches` (k templates per document by
Gaussian coverage pooling, hubness correction and MMR diversity)."""

import polars as pl
from dagster import (
    AssetCheckResult,
    AssetCheckSpec,
    AssetExecutionContext,
    AutomationCondition,
    MaterializeResult,
    MetadataValue,
    asset,
)

from fineinstructions_dagster.defs.automation import shard_step
from fineinstructions_dagster.defs.documents.assets import documents
from fineinstructions_dagster.defs.metadata import (
    for_each_partition,
    preview_markdown,
    progress_reporter,
    stage_metadata,
    throughput_metadata,
)
from fineinstructions_dagster.defs.partitions import batched_backfill, corpus_shard_partitions
from fineinstructions_dagster.defs.resources import EmbedderResource, PipelineResource, StorageResource
from fineinstructions_dagster.defs.settings import INDEX_SETTINGS, MATCHING_SETTINGS
from fineinstructions_dagster.defs.templates.assets import template_bank
from fineinstructions_dagster.lib.chunks import ChunkOutput, chunks_of, count_rows, definition_hash, run_chunked
from fineinstructions_dagster.lib.versions import code_version
from fineinstructions_dagster.stages import embedding, matching, pooling
from fineinstructions_dagster.stages.matching import (
    MATCH_SCHEMA,
    UNMATCHED_SCHEMA,
    build_template_index,
    match_documents,
    match_problems,
    open_template_index,
    template_index_id,
    template_usage_of,
    unchanged_template_index,
    unmatched_documents,
    usage_summary_of,
)

CODE_VERSION = code_version(matching, embedding, pooling)

INDEX_DIR = "template_index"
MATCHES_WELL_FORMED = "matches_well_formed"
INDEX_COVERS_BANK = "index_covers_every_template"


@asset(automation_condition=AutomationCondition.eager(),
       deps=[template_bank, INDEX_SETTINGS.key], group_name="matching", kinds={"usearch", "sentence_transformers"},
       code_version=CODE_VERSION,
       check_specs=[AssetCheckSpec(INDEX_COVERS_BANK, asset="template_index",
                                   description="one vector per template of the current bank")])
def template_index(storage: StorageResource, embedder: EmbedderResource,
                   pipeline: PipelineResource) -> MaterializeResult:
    """Embeddings of every template's compatible document description in a usearch index, saved with its id
    map and a meta file pinning the embedder (name, revision), the bank and the index settings. When only
    templates were added or removed, the previous index is updated rather than rebuilt; when nothing changed
    it is left as it is (`build: unchanged`). A new index is published as a new version of the folder, made
    current in one step (`TableStore.staged_dir`)."""
    store = storage.store()
    bank = store.read("template_bank")
    emb, cfg = embedder.embedder(), pipeline.config().template_index
    current = store.dir(INDEX_DIR)
    previous = current if current.exists() else None
    index_id = template_index_id(bank, emb, cfg)
    meta = unchanged_template_index(previous, index_id)
    if meta is None:
        with store.staged_dir(INDEX_DIR, label=index_id) as tmp:
            meta = build_template_index(bank, emb, tmp, cfg, previous=previous)
        current = store.dir(INDEX_DIR)
    return MaterializeResult(metadata={
        "dagster/row_count": meta.n_templates, "index_id": meta.index_id,
        "embedder": f"{meta.embedder}@{meta.embedder_revision}", "dim": meta.dim, "bank_hash": meta.bank_hash,
        "index": f"{meta.metric}/{meta.dtype} M={meta.connectivity} ef_add={meta.expansion_add} "
                 f"ef_search={meta.expansion_search}",
        "build": meta.build, "added": meta.added, "removed": meta.removed, "parent_index_id": meta.parent_index_id,
        "path": MetadataValue.path(store.uri_of(current)),
    }, check_results=[AssetCheckResult(check_name=INDEX_COVERS_BANK, passed=meta.n_templates == bank.height,
                                       metadata={"vectors": meta.n_templates, "templates": bank.height})])


@asset(partitions_def=corpus_shard_partitions, backfill_policy=batched_backfill, automation_condition=shard_step(),
       deps=[documents, template_index, template_bank, MATCHING_SETTINGS.key],
       group_name="matching", code_version=CODE_VERSION,
       kinds={"usearch", "parquet"}, check_specs=[AssetCheckSpec(MATCHES_WELL_FORMED, asset="matches")])
def matches(context: AssetExecutionContext, storage: StorageResource, embedder: EmbedderResource,
            pipeline: PipelineResource) -> MaterializeResult:
    """For each document of the shard, k templates: every Gaussian-coverage pooled vector of the document
    queries the index; candidates merged per template (best chunk kept), hubness-corrected, chosen by MMR. The
    shard's documents are read `chunk_rows` at a time (the hubness penalty is estimated per chunk), each chunk
    kept as a part, so a killed run resumes."""
    cfg = pipeline.config().match_config()
    chunk_rows = pipeline.config().chunk_rows
    store = storage.store()
    emb = embedder.embedder()
    tindex = open_template_index(store.dir(INDEX_DIR), emb, store.read("template_bank"))

    # the code, the index it searches, the settings in force (defs/settings.py)
    definition = definition_hash("matches", CODE_VERSION, tindex.meta.index_id,
                                 MATCHING_SETTINGS.version({"pipeline": pipeline, "embedder": embedder}))

    def one(shard: str) -> MaterializeResult:
        source = store.file("documents", shard)

        def process(chunk: pl.DataFrame) -> ChunkOutput:
            found, stats = match_documents(chunk, tindex, emb, cfg, context.run_id)
            return ChunkOutput(found, unmatched_documents(chunk, found), stats)

        run = run_chunked(store, "matches", shard, chunks_of(source, chunk_rows, None, ["doc_id", "shard", "text"]),
                          "doc_id", definition, process, pl.DataFrame(schema=MATCH_SCHEMA),
                          pl.DataFrame(schema=UNMATCHED_SCHEMA), count_rows(source), progress_reporter(context))
        path = store.path("matches", shard)
        usage = template_usage_of(path)
        run.stats.extra.update(matches=int(usage["uses"].sum()) if usage.height else 0,
                               **usage_summary_of(usage, path))
        problems = sorted({p for part in chunks_of(path, chunk_rows, "doc_id") for p in match_problems(part, cfg.k)})
        return MaterializeResult(
            metadata=stage_metadata(
                run.stats, pl.read_parquet(path, n_rows=5), ["match_id", "doc_id", "template_id", "chunk", "score",
                                                              "rank"],
                row_count=int(run.stats.extra["matches"]), index_id=tindex.meta.index_id, matcher=cfg.describe(),
                template_usage=MetadataValue.md(preview_markdown(usage, list(usage.columns), rows=10)),
                **throughput_metadata(run)),
            check_results=[AssetCheckResult(check_name=MATCHES_WELL_FORMED, passed=not problems,
                                            metadata={"problems": "; ".join(problems) or "none"})])

    return for_each_partition(context, one)
