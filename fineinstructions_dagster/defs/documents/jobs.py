"""`filter_job` (one shard through the filters) and `dedup_job` (exact and near duplicates across shards)."""

from dagster import define_asset_job

from fineinstructions_dagster.defs import steps
from fineinstructions_dagster.defs.partitions import corpus_shard_partitions

filter_job = define_asset_job("filter_job", selection=steps.FILTER_STEP, partitions_def=corpus_shard_partitions,
                              description="Stream one corpus shard through the quality filters; write its "
                                          "MinHash signatures and LSH band rows.")
dedup_job = define_asset_job("dedup_job", selection=steps.DEDUP_STEP,
                             description="Exact and near duplicates across every filtered shard: launch it for "
                                         "every bucket range (a backfill spreads the ranges over runs), the "
                                         "components and per-shard removal lists follow.")
