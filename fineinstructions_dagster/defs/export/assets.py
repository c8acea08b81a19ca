"""`pretraining_export` [shard]: one step writing two tables, `export_chat` (the final pairs as chat-format Parquet
+ JSON Lines) and `export_packed` (packed, tokenized sequences with an answer-only loss mask). Downstream of the
dbt quality models, whose tests are blocking checks: automation exports a shard once its pairs were updated and
the tests passed (defs/automation.py)."""

import polars as pl
from dagster import (
    AssetCheckResult,
    AssetCheckSpec,
    AssetExecutionContext,
    AssetSpec,
    Failure,
    MaterializeResult,
    MetadataValue,
    multi_asset,
)

from fineinstructions_dagster.defs.automation import after_blocking_checks
from fineinstructions_dagster.defs.metadata import progress_reporter, stage_metadata, throughput_metadata
from fineinstructions_dagster.defs.pairs.assets import control_check, fineinstructions, judged_controls_kept
from fineinstructions_dagster.defs.partitions import corpus_shard_partitions
from fineinstructions_dagster.defs.quality.assets import QUALITY_PAIRS_KEY, dbt_quality, refuse_unless_checks_passed
from fineinstructions_dagster.defs.resources import LLMResource, PipelineResource, StorageResource
from fineinstructions_dagster.defs.settings import EXPORT_SETTINGS
from fineinstructions_dagster.lib.chunks import ChunkOutput, chunks_of, count_rows, definition_hash, run_chunked
from fineinstructions_dagster.lib.stats import StageStats
from fineinstructions_dagster.lib.versions import code_version
from fineinstructions_dagster.stages import export as export_stage
from fineinstructions_dagster.stages.export import (
    PACKED_SCHEMA,
    PackingConfig,
    chat_records,
    load_tokenizer,
    pack,
    tokenize_pairs,
)

CODE_VERSION = code_version(export_stage)

CHAT_TABLE = "export_chat"
PACKED_TABLE = "export_packed"
EXPORTED_ONCE = "every_pair_exported_once"


# Reads the shard's pairs; the dbt models are a gate (their blocking tests), not read.
_GATE = sorted(dbt_quality.keys)
_COMMON = {"deps": [*fineinstructions.keys, *_GATE, EXPORT_SETTINGS.key], "group_name": "export",
           "automation_condition": after_blocking_checks(QUALITY_PAIRS_KEY), "code_version": CODE_VERSION}


@multi_asset(
    name="pretraining_export", partitions_def=corpus_shard_partitions,
    specs=[AssetSpec(CHAT_TABLE, kinds={"parquet", "json"}, **_COMMON,
                     description="The shard's final pairs as chat records (`messages`), Parquet and JSON Lines."),
           AssetSpec(PACKED_TABLE, kinds={"parquet"}, **_COMMON,
                     description="The same pairs tokenized and packed into fixed-length sequences; the loss mask "
                                 "covers only the answers.")],
    check_specs=[AssetCheckSpec(EXPORTED_ONCE, asset=CHAT_TABLE,
                                description="chat records = the shard's pairs, each once; each packed pair once")])
def pretraining_export(context: AssetExecutionContext, storage: StorageResource, pipeline: PipelineResource,
                       instantiator_llm: LLMResource):  # noqa: ANN201 - a generator of MaterializeResults
    """Chat records (`messages`) for TRL-style SFT loaders, and the same pairs tokenized and packed into
    `export_seq_len` sequences whose loss mask covers only the answers. Tokenizer: `export_tokenizer`, else
    the instantiator model's. Refuses, naming them, while a dbt test's latest evaluation did not pass."""
    shard = context.partition_key
    refuse_unless_checks_passed(context, shard)
    cfg = pipeline.config()
    store = storage.store()
    # The shard's own control check, from its data: Dagster records one latest evaluation per check, not per shard.
    controls = control_check(*judged_controls_kept(store, shard), cfg.max_control_kept_share, cfg.control_check_blocks,
                             shard)
    if not controls.passed:
        raise Failure(description=f"pretraining_export [{shard}] not run: {controls.description}",
                      metadata={"control_check": str(controls.description)})
    source = store.file("fineinstructions", shard)
    total = count_rows(source)
    packing = PackingConfig(tokenizer=cfg.export_tokenizer or instantiator_llm.model_name(), seq_len=cfg.export_seq_len)
    tok = load_tokenizer(packing.tokenizer)
    report = progress_reporter(context)

    no_rows = pl.DataFrame(schema={"pair_id": pl.String})  # the export rejects nothing: empty quarantine parts

    def chat(chunk: pl.DataFrame) -> ChunkOutput:
        return ChunkOutput(chat_records(chunk), no_rows, StageStats(total=chunk.height, kept=chunk.height))

    def packed(chunk: pl.DataFrame) -> ChunkOutput:
        # Sequences never cross a chunk: at most one part-filled sequence per chunk of `chunk_rows` pairs.
        seqs, stats = pack(tokenize_pairs(chunk, tok), packing.seq_len, tok.pad_token_id or 0,
                           f"{shard}:{chunk['pair_id'].min()}")
        stats.extra.pop("fill", None)
        return ChunkOutput(seqs, no_rows, stats)

    run_chunked(store, CHAT_TABLE, shard, chunks_of(source, cfg.chunk_rows, None), "pair_id",
                definition_hash(CHAT_TABLE, CODE_VERSION), chat, chat(pl.read_parquet(source, n_rows=0)).kept, no_rows,
                total, report)
    jsonl = store.write_jsonl_from(CHAT_TABLE, shard)
    run = run_chunked(store, PACKED_TABLE, shard, chunks_of(source, cfg.chunk_rows, None), "pair_id",
                      definition_hash(PACKED_TABLE, CODE_VERSION, EXPORT_SETTINGS.version(
                          {"pipeline": pipeline, "instantiator_llm": instantiator_llm})),
                      packed, pl.DataFrame(schema=PACKED_SCHEMA), no_rows, total, report)
    stats = run.stats
    sequences = pl.scan_parquet(store.path(PACKED_TABLE, shard))
    summary = sequences.select(pl.len().alias("n"), (pl.col("attention_mask").list.sum() / packing.seq_len).mean()
                               .alias("fill")).collect()
    stats.extra.update(sequences=int(summary["n"][0]), fill=round(float(summary["fill"][0] or 0.0), 4))
    chat_ids = pl.scan_parquet(store.path(CHAT_TABLE, shard)).select("pair_id")
    packed_ids = sequences.select(pl.col("pair_ids").explode().alias("pair_id")).drop_nulls()
    pair_ids = pl.scan_parquet(source).select("pair_id")
    ok = (chat_ids.select(pl.len()).collect().item() == total
          and chat_ids.join(pair_ids, on="pair_id", how="anti").select(pl.len()).collect().item() == 0
          and not packed_ids.select(pl.col("pair_id").is_duplicated().any()).collect().item()
          and packed_ids.join(pair_ids, on="pair_id", how="anti").select(pl.len()).collect().item() == 0)
    preview = pl.read_parquet(store.path(CHAT_TABLE, shard), n_rows=5)
    yield MaterializeResult(asset_key=PACKED_TABLE, metadata={
        "dagster/row_count": int(summary["n"][0]), "tokenizer": packing.tokenizer, "seq_len": packing.seq_len,
        "fill": stats.extra["fill"],
        "packed_parquet": MetadataValue.path(store.uri_of(store.path(PACKED_TABLE, shard)))})
    yield MaterializeResult(asset_key=CHAT_TABLE,
                            check_results=[AssetCheckResult(check_name=EXPORTED_ONCE, passed=bool(ok))],
                            metadata=stage_metadata(
        stats, preview, ["pair_id", "messages"], row_count=total, tokenizer=packing.tokenizer,
        seq_len=packing.seq_len, chat_parquet=MetadataValue.path(store.uri_of(store.path(CHAT_TABLE, shard))),
        chat_jsonl=MetadataValue.path(store.uri_of(jsonl)),
        packed_parquet=MetadataValue.path(store.uri_of(store.path(PACKED_TABLE, shard))),
        **throughput_metadata(run)))
