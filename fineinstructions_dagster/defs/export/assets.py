"""`pretraining_export` [shard]: the final pairs as chat-format Parquet + JSON Lines and as packed, tokenized
sequences with an answer-only loss mask. Gated on the dbt quality tests (defs/quality): it refuses to run while
any of them failed, or has not been evaluated since the shard's pairs were last materialized."""

import polars as pl
from dagster import AssetCheckResult, AssetCheckSpec, AssetExecutionContext, MaterializeResult, MetadataValue, asset

from fineinstructions_dagster.defs.metadata import stage_metadata
from fineinstructions_dagster.defs.pairs.assets import fineinstructions
from fineinstructions_dagster.defs.partitions import corpus_shard_partitions
from fineinstructions_dagster.defs.quality.assets import QUALITY_PAIRS_KEY, export_gate
from fineinstructions_dagster.defs.resources import LLMResource, PipelineResource, StorageResource
from fineinstructions_dagster.stages.export import PackingConfig, chat_records, load_tokenizer, pack, tokenize_pairs

CHAT_TABLE = "export_chat"
PACKED_TABLE = "export_packed"
EXPORTED_ONCE = "every_pair_exported_once"


@asset(partitions_def=corpus_shard_partitions, deps=[fineinstructions, QUALITY_PAIRS_KEY], group_name="export",
       kinds={"parquet", "json"},
       check_specs=[AssetCheckSpec(EXPORTED_ONCE, asset="pretraining_export",
                                   description="chat records = the shard's pairs, each once; each packed pair once")])
def pretraining_export(context: AssetExecutionContext, storage: StorageResource, pipeline: PipelineResource,
                       instantiator_llm: LLMResource) -> MaterializeResult:
    """Chat records (`messages`) for TRL-style SFT loaders, and the same pairs tokenized and packed into
    `export_seq_len` sequences whose loss mask covers only the answers. Tokenizer: `export_tokenizer`, else
    the instantiator model's. Runs only when every dbt quality test (quality_job) passed on the shard's current
    pairs; otherwise fails naming the tests."""
    shard = context.partition_key
    gate = export_gate(context, shard)
    cfg = pipeline.config()
    store = storage.store()
    pairs = store.read("fineinstructions", shard)
    chat = chat_records(pairs)
    store.write(CHAT_TABLE, chat, shard)
    jsonl = store.write_jsonl(CHAT_TABLE, chat, shard)
    packing = PackingConfig(tokenizer=cfg.export_tokenizer or instantiator_llm.model, seq_len=cfg.export_seq_len)
    tok = load_tokenizer(packing.tokenizer)
    packed, stats = pack(tokenize_pairs(pairs, tok), packing.seq_len, tok.pad_token_id or 0, shard)
    store.write(PACKED_TABLE, packed, shard)
    packed_ids = packed["pair_ids"].explode().drop_nulls() if packed.height else pl.Series([], dtype=pl.String)
    ok = (sorted(chat["pair_id"]) == sorted(pairs["pair_id"]) and packed_ids.is_unique().all()
          and packed_ids.is_in(pairs["pair_id"].implode()).all())
    return MaterializeResult(check_results=[AssetCheckResult(check_name=EXPORTED_ONCE, passed=bool(ok))],
                             metadata=stage_metadata(
        stats, chat, ["pair_id", "messages"], row_count=chat.height, tokenizer=packing.tokenizer,
        seq_len=packing.seq_len, chat_parquet=MetadataValue.path(store.uri_of(store.path(CHAT_TABLE, shard))),
        chat_jsonl=MetadataValue.path(store.uri_of(jsonl)),
        packed_parquet=MetadataValue.path(store.uri_of(store.path(PACKED_TABLE, shard))), **gate))
