"""`export_job`: one shard's pairs for pre-training."""

from dagster import define_asset_job

from fineinstructions_dagster.defs import steps
from fineinstructions_dagster.defs.partitions import corpus_shard_partitions

export_job = define_asset_job("export_job", selection=steps.EXPORT_STEP, partitions_def=corpus_shard_partitions,
                              description="Export a shard for pre-training; refuses while a dbt test's latest "
                                          "evaluation did not pass.")
