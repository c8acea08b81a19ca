"""`shard_job` (a shard's chain from documents to pairs) and `report_job`."""

from dagster import define_asset_job

from fineinstructions_dagster.defs import steps
from fineinstructions_dagster.defs.partitions import corpus_shard_partitions

shard_job = define_asset_job("shard_job", partitions_def=corpus_shard_partitions, selection=steps.SHARD_STEP,
                             description="Documents -> matches -> instantiations -> judgements -> pairs for a shard.")
report_job = define_asset_job("report_job", selection=steps.REPORT_STEP, description="Rebuild the report.")
