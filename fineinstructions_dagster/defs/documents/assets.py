"""`filtered_documents` (per shard, streamed; writes the shard's MinHash signatures and LSH band rows beside
it), `duplicate_edges` (per bucket range: confirmed duplicate edges across every shard), `document_clusters`
(components over the edges -> per-shard removal lists) and `documents` (per shard, deduplicated)."""

import hashlib
from collections.abc import Iterator

import polars as pl
from dagster import (
    AllPartitionMapping,
    AssetCheckResult,
    AssetCheckSpec,
    AssetDep,
    AssetExecutionContext,
    AssetObservation,
    AssetSpec,
    BackfillPolicy,
    DataVersion,
    MaterializeResult,
    asset,
    multi_asset,
    multi_observable_source_asset,
)

from fineinstructions_dagster.defs.automation import (
    REMOVAL_LISTS,
    after_dedup_of_own_shard,
    input_files_replaced,
    over_every_partition,
)
from fineinstructions_dagster.defs.decontamination.assets import BENCHMARK_NGRAMS, load_index
from fineinstructions_dagster.defs.inputs import corpus_shards, log_skipped_inputs, skipped_metadata
from fineinstructions_dagster.defs.metadata import explore_links, for_each_partition, stage_metadata
from fineinstructions_dagster.defs.observations import (
    CORPUS_FILES,
    DATA_VERSION_TAG,
    FIXED_DATA_VERSION_TAG,
    observed_versions,
)
from fineinstructions_dagster.defs.partitions import batched_backfill, bucket_range_partitions, corpus_shard_partitions
from fineinstructions_dagster.defs.resources import InputsResource, PipelineResource, StorageResource
from fineinstructions_dagster.defs.settings import DEDUP_SETTINGS, FILTER_SETTINGS
from fineinstructions_dagster.lib.storage import TableStore
from fineinstructions_dagster.lib.versions import code_version
from fineinstructions_dagster.stages import dedup as dedup_stage
from fineinstructions_dagster.stages import documents as documents_stage
from fineinstructions_dagster.stages.dedup import (
    BAND_SCHEMA,
    DECISION_SCHEMA,
    SIGNATURE_SCHEMA,
    bucket_range_keys,
    decide_duplicates,
    range_edges,
    sort_band_rows,
)
from fineinstructions_dagster.stages.documents import apply_duplicate_decisions, empty_documents, prepare_shard

FILTER_CODE = code_version(documents_stage, dedup_stage)  # filters and MinHash signatures, one pass
DEDUP_CODE = code_version(dedup_stage)

DOC_ID_UNIQUE = "doc_id_unique"
FILTERED_IDS_UNIQUE = "filtered_doc_ids_unique_with_text"
SIGNATURES = "document_signatures"
BANDS = "document_bands"
EDGES = "duplicate_edges"
CLUSTERS = "document_clusters"
CLUSTERS_STATE = f"{CLUSTERS}/_state.json"  # which version of which shard the removal lists were decided on
# Selecting one of the three tables of the filter step selects all three (one pass over the shard writes them).
FILTER_ASSETS = ["filtered_documents", SIGNATURES, BANDS]


def signature_versions(store: TableStore, shards: list[str]) -> dict[str, str]:
    """shard -> the run that wrote its signatures and band rows (their sidecar), for shards that have them."""
    out = {}
    for shard in shards:
        meta = store.read_json(f"{SIGNATURES}/{shard}.json")
        if meta is not None:
            out[shard] = meta["run_id"]
    return out


def current_signature_versions(context: AssetExecutionContext, store: TableStore) -> dict[str, str]:
    known = set(context.instance.get_dynamic_partitions(corpus_shard_partitions.name))
    return signature_versions(store, [s for s in store.partitions(SIGNATURES) if s in known])


FILTER_DEPS = [CORPUS_FILES, FILTER_SETTINGS.key, BENCHMARK_NGRAMS]


@multi_asset(
    specs=[AssetSpec("filtered_documents", group_name="documents", kinds={"polars", "parquet"},
                     code_version=FILTER_CODE, deps=FILTER_DEPS,
                     automation_condition=input_files_replaced(),
                     description="A corpus shard after the quality filters; dropped documents in quarantine."),
           AssetSpec(SIGNATURES, group_name="documents", kinds={"numpy", "parquet"}, code_version=FILTER_CODE,
                     deps=FILTER_DEPS, automation_condition=input_files_replaced(),
                     description="MinHash signature of every filtered document (doc_key, 120 x uint32)."),
           AssetSpec(BANDS, group_name="documents", kinds={"numpy", "parquet"}, code_version=FILTER_CODE,
                     deps=FILTER_DEPS, automation_condition=input_files_replaced(),
                     description="LSH band rows (bucket, band, key, doc_key) of the shard, sorted by bucket.")],
    partitions_def=corpus_shard_partitions, name="filtered_documents",
    check_specs=[AssetCheckSpec(FILTERED_IDS_UNIQUE, asset="filtered_documents",
                                description="doc_id unique within the shard; no kept document without text")])
def filtered_documents(context: AssetExecutionContext, storage: StorageResource, inputs: InputsResource,
                       pipeline: PipelineResource):  # noqa: ANN201 - a generator of MaterializeResults
    """One corpus shard streamed in batches through boilerplate-line removal, Gopher quality and repetition
    rules, language ID, the domain blocklist and benchmark decontamination; MinHash signatures and LSH band rows
    of the survivors are stored beside them for cross-shard dedup. Dropped documents go to quarantine with their
    reason (a benchmark overlap with the benchmark, item id and n-gram)."""
    cfg = pipeline.config()
    shard = context.partition_key
    found = corpus_shards(inputs.corpus())
    if shard not in found:
        raise FileNotFoundError(f"corpus shard {shard!r}: no input file for it in {inputs.corpus()}")
    skipped = log_skipped_inputs(context.log, inputs.corpus())
    store = storage.store()
    benchmarks, index_metadata = load_index(store, pipeline, inputs)
    with store.scratch(f"filtered_documents-{shard}") as scratch:
        out = prepare_shard(found[shard], shard, cfg.documents, cfg.minhash, scratch, context.run_id,
                            cfg.document_batch_rows, benchmarks)
        if out.bands:
            with store.publish(BANDS, shard) as tmp:
                sort_band_rows(out.bands, tmp, scratch)
        else:
            store.write(BANDS, pl.DataFrame(schema=BAND_SCHEMA), shard)
        store.write_parts(SIGNATURES, out.signatures, pl.DataFrame(schema=SIGNATURE_SCHEMA), shard)
        store.write_json(f"{SIGNATURES}/{shard}.json", {"run_id": context.run_id, "minhash": cfg.minhash.version,
                                                        "rows": out.stats.kept})
        store.write_parts("filtered_documents", out.kept, empty_documents(), shard)
        rejected = [pl.read_parquet(out.rejected)] if out.rejected else []
        store.write("filtered_documents", pl.concat([*rejected, out.malformed], how="diagonal_relaxed"), shard,
                    quarantine=True)
    kept = pl.scan_parquet(store.path("filtered_documents", shard))
    preview = kept.head(5).collect()  # not the whole shard
    bad = kept.select(pl.col("doc_id").is_duplicated().any() | (pl.col("text").str.len_chars() == 0).any()).collect()
    yield MaterializeResult(
        asset_key="filtered_documents",
        metadata=stage_metadata(out.stats, preview, ["doc_id", "url", "n_words", "language", "text"],
                                minhash=cfg.minhash.version, **skipped_metadata(skipped), **index_metadata,
                                **{f"seconds_{k}": round(v, 3) for k, v in out.seconds.items()}),
        check_results=[AssetCheckResult(check_name=FILTERED_IDS_UNIQUE, passed=not bool(bad.item()))])
    yield MaterializeResult(asset_key=SIGNATURES, metadata={"dagster/row_count": out.stats.kept,
                                                            "minhash": cfg.minhash.version})
    yield MaterializeResult(asset_key=BANDS, metadata={"dagster/row_count": out.stats.kept * (cfg.minhash.bands + 1),
                                                       "minhash": cfg.minhash.version})


@asset(partitions_def=bucket_range_partitions, group_name="documents", kinds={"numpy", "parquet"},
       code_version=DEDUP_CODE,
       automation_condition=over_every_partition(),
       deps=[AssetDep(BANDS, partition_mapping=AllPartitionMapping()),
             AssetDep(SIGNATURES, partition_mapping=AllPartitionMapping()), DEDUP_SETTINGS.key],
       # A backfill runs 4 ranges per run: the run launcher spreads the 16 ranges over 4 workers (machines).
       backfill_policy=BackfillPolicy.multi_run(max_partitions_per_run=4))
def duplicate_edges(context: AssetExecutionContext, storage: StorageResource,
                    pipeline: PipelineResource) -> MaterializeResult:
    """One range of LSH buckets over every shard: band rows grouped by key a chunk of buckets at a time (memory
    stays at one chunk), documents sharing a key linked, each link confirmed by the estimated Jaccard
    similarity of the two signatures (read for the linked documents only)."""
    cfg = pipeline.config()
    store = storage.store()
    versions = current_signature_versions(context, store)
    if not versions:
        raise ValueError("no materialized filtered_documents partition: materialize filtered_documents first")

    bands = {s: store.file(BANDS, s) for s in versions}
    signatures = {s: store.file(SIGNATURES, s) for s in versions}

    def one(range_key: str) -> MaterializeResult:
        edges = range_edges(bands, signatures, range_key, cfg.minhash)
        store.write(EDGES, edges, range_key)
        store.write_json(f"{EDGES}/{range_key}.json", {"shards": versions, "minhash": cfg.minhash.version})
        return MaterializeResult(metadata={
            "dagster/row_count": edges.height, "shards": len(versions),
            "exact_edges": int(edges["exact"].sum()), "near_edges": int((~edges["exact"]).sum())})

    return for_each_partition(context, one)


@asset(automation_condition=over_every_partition(),
       deps=[AssetDep(EDGES, partition_mapping=AllPartitionMapping()),
             AssetDep(SIGNATURES, partition_mapping=AllPartitionMapping()),  # which shards, which versions
             DEDUP_SETTINGS.key],
       group_name="documents", code_version=DEDUP_CODE, tags={FIXED_DATA_VERSION_TAG: "true"},
       kinds={"numpy", "scipy"})
def document_clusters(context: AssetExecutionContext, storage: StorageResource,
                      pipeline: PipelineResource) -> MaterializeResult:
    """Connected components over every bucket range's confirmed edges, then one removal list per shard (a
    shard's `documents` reads only its own). Under the default `stable` rule a decision once made stays put:
    documents of shards decided before keep their decisions and a new shard's copies of them are removed;
    `rebuild` decides from scratch, each cluster keeping its smallest doc_id."""
    cfg = pipeline.config()
    store = storage.store()
    versions = current_signature_versions(context, store)
    if not versions:
        raise ValueError("no materialized filtered_documents partition: materialize filtered_documents first")
    ranges = {r: store.read_json(f"{EDGES}/{r}.json") for r in bucket_range_keys()}
    missing = [r for r, meta in ranges.items() if meta is None]
    stale = [r for r, meta in ranges.items() if meta is not None
             and (meta["shards"] != versions or meta["minhash"] != cfg.minhash.version)]
    if missing or stale:
        raise ValueError(f"duplicate_edges is not current for bucket ranges {', '.join(missing + stale)} "
                         f"({len(missing)} never materialized, {len(stale)} computed over other shards or "
                         "signatures than the current ones): materialize every duplicate_edges partition first")
    state = store.read_json(CLUSTERS_STATE)
    decided: set[str] = set()
    if state is not None and state.get("minhash") == cfg.minhash.version and cfg.minhash.keep == "stable":
        decided = {s for s, v in state["shards"].items() if versions.get(s) == v}
    # the removal lists written before, read once: the stable rule's input and what "changed" compares with
    before = {s: store.read(CLUSTERS, s) for s in (state or {"shards": {}})["shards"] if s in versions
              and store.exists(CLUSTERS, s)}
    prior = [before[s] for s in sorted(decided) if s in before]
    edge_rows = 0

    def edges() -> Iterator[pl.DataFrame]:
        nonlocal edge_rows
        for r in bucket_range_keys():
            frame = store.read(EDGES, r)
            edge_rows += frame.height
            yield frame

    removed = decide_duplicates(edges(), cfg.minhash, pl.concat(prior) if prior else None, decided,
                                shards=sorted(versions), removed_only=True)
    changed = []
    observed = observed_versions(context.instance, REMOVAL_LISTS)
    for shard in sorted(versions):
        mine = removed.filter(pl.col("shard") == shard).sort("doc_id")
        if shard not in before or not before[shard].sort("doc_id").equals(mine):
            store.write(CLUSTERS, mine, shard)
            changed.append(shard)
        if shard in changed or shard not in observed:
            # the shard's removal list has a new data version: its `documents` (and only its) becomes stale
            context.log_event(removal_list_observation(shard, mine))
    store.write_json(CLUSTERS_STATE, {"shards": versions, "minhash": cfg.minhash.version, "keep": cfg.minhash.keep})
    by_reason = removed.group_by("shard", "reason").len().sort("shard", "reason")
    # A fixed data version: what a shard's `documents` reads is versioned by its removal list (above), so a
    # decision run that left a shard's list as it was does not make that shard's chain stale.
    return MaterializeResult(data_version=DataVersion(f"by shard, in {REMOVAL_LISTS}"), metadata={
        "dagster/row_count": removed.height, "shards": len(versions),
        "changed_shards": ", ".join(changed), "duplicate_clusters": removed["cluster"].n_unique(),
        "exact_duplicates": int((removed["reason"] == "exact_duplicate").sum()),
        "near_duplicates": int((removed["reason"] == "near_duplicate").sum()),
        "rule": cfg.minhash.keep, "decided_before": len(decided), "edges": edge_rows,
        "minhash": cfg.minhash.version, "by_shard": {f"{s}/{r}": int(n) for s, r, n in by_reason.rows()},
    })


def removal_list_version(removed: pl.DataFrame) -> str:
    """The data version of one shard's removal list: a hash of its rows, sorted by doc_id."""
    return hashlib.sha256(removed.sort("doc_id").write_csv().encode()).hexdigest()[:16]


def removal_list_observation(shard: str, removed: pl.DataFrame) -> AssetObservation:
    return AssetObservation(asset_key=REMOVAL_LISTS, partition=shard, metadata={"dagster/row_count": removed.height},
                            tags={DATA_VERSION_TAG: removal_list_version(removed)})


# Each shard's removal list, as its own versioned input of that shard's `documents`: observed by the
# document_clusters run that changed it (or, from the UI, read again from storage); never materialized by itself.
@multi_observable_source_asset(
    specs=[AssetSpec(REMOVAL_LISTS, partitions_def=corpus_shard_partitions, group_name="documents",
                     deps=[CLUSTERS], kinds={"parquet"}, skippable=True,
                     description="One shard's dedup removal list (written by document_clusters); data version: a "
                                 "hash of its rows, recorded when a decision run changes it.")],
    can_subset=True)
def removal_lists(context: AssetExecutionContext, storage: StorageResource) -> None:
    store = storage.store()
    known = set(context.instance.get_dynamic_partitions(corpus_shard_partitions.name))
    for shard in sorted(s for s in store.partitions(CLUSTERS) if s in known):
        context.log_event(removal_list_observation(shard, store.read(CLUSTERS, shard)))


@asset(partitions_def=corpus_shard_partitions, backfill_policy=batched_backfill,
       automation_condition=after_dedup_of_own_shard(),
       deps=["filtered_documents", SIGNATURES, document_clusters, REMOVAL_LISTS],
       group_name="documents", kinds={"polars", "parquet"}, code_version=FILTER_CODE,
       check_specs=[AssetCheckSpec(DOC_ID_UNIQUE, asset="documents")])
def documents(context: AssetExecutionContext, storage: StorageResource) -> MaterializeResult:
    """The shard's filtered documents minus exact and near duplicates found across all shards; removed
    ones are in quarantine with the doc_id (and shard) they duplicate and the estimated similarity. Reads its
    own shard's removal list only."""
    store = storage.store()
    state = store.read_json(CLUSTERS_STATE) or {"shards": {}}

    def one(shard: str) -> MaterializeResult:
        mine = signature_versions(store, [shard]).get(shard)
        if state["shards"].get(shard) is None or state["shards"][shard] != mine:
            raise ValueError(f"shard {shard!r} has no dedup decisions for its current filtered_documents: "
                             "materialize duplicate_edges (every bucket range) and document_clusters first")
        decisions = (store.read(CLUSTERS, shard) if store.exists(CLUSTERS, shard)
                     else pl.DataFrame(schema=DECISION_SCHEMA))
        kept, removed, stats = apply_duplicate_decisions(store.read("filtered_documents", shard), decisions,
                                                         context.run_id)
        store.write("documents", kept.sort("doc_id"), shard)  # sorted: later stages read a chunk's ids by range
        store.write("documents", removed, shard, quarantine=True)
        shard_page, links = explore_links(shard)
        return MaterializeResult(
            metadata=stage_metadata(stats, kept, ["doc_id", "url", "n_words", "text"], links=links,
                                    duplicate_clusters=removed["cluster"].n_unique(), **shard_page),
            check_results=[AssetCheckResult(check_name=DOC_ID_UNIQUE, passed=bool(kept["doc_id"].is_unique().all()))],
        )

    return for_each_partition(context, one)
