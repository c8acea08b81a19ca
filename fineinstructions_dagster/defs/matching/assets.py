"""`template_index` (usearch over description embeddings) and `matches` (top-k templates per document)."""

from dagster import AssetExecutionContext, MaterializeResult, MetadataValue, asset

from fineinstructions_dagster.defs.documents.assets import documents
from fineinstructions_dagster.defs.metadata import stage_metadata
from fineinstructions_dagster.defs.partitions import corpus_shard_partitions
from fineinstructions_dagster.defs.resources import EmbedderResource, PipelineResource, StorageResource
from fineinstructions_dagster.defs.templates.assets import template_bank
from fineinstructions_dagster.stages.matching import build_template_index, match_documents, open_template_index

INDEX_DIR = "template_index"


@asset(deps=[template_bank], group_name="matching", kinds={"usearch", "sentence_transformers"})
def template_index(storage: StorageResource, embedder: EmbedderResource) -> MaterializeResult:
    """Embeddings of every template's compatible document description in a usearch index, saved with
    its id map and a meta file pinning the embedder and the bank it was built from."""
    store = storage.store()
    bank = store.read("template_bank")
    with store.staged_dir(INDEX_DIR) as tmp:
        meta = build_template_index(bank, embedder.embedder(), tmp)
    return MaterializeResult(metadata={
        "dagster/row_count": meta.n_templates, "index_id": meta.index_id, "embedder": meta.embedder,
        "dim": meta.dim, "bank_hash": meta.bank_hash, "path": MetadataValue.path(str(store.dir(INDEX_DIR))),
    })


@asset(partitions_def=corpus_shard_partitions, deps=[documents, template_index], group_name="matching",
       kinds={"usearch", "parquet"})
def matches(context: AssetExecutionContext, storage: StorageResource, embedder: EmbedderResource,
            pipeline: PipelineResource) -> MaterializeResult:
    """For each document of the shard, the k templates whose compatible document descriptions are
    nearest to the document's embedding, with score and rank."""
    cfg = pipeline.config()
    store = storage.store()
    emb = embedder.embedder()
    tindex = open_template_index(store.dir(INDEX_DIR), emb, store.read("template_bank"))
    docs = store.read("documents", context.partition_key)
    found, stats = match_documents(docs, tindex, emb, cfg.templates_per_document, cfg.min_match_score,
                                   context.run_id)
    store.write("matches", found, context.partition_key)
    return MaterializeResult(metadata=stage_metadata(stats, found, ["doc_id", "template_id", "score", "rank"],
                                                     row_count=found.height, index_id=tindex.meta.index_id))
