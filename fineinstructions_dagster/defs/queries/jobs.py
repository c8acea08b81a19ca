"""`queries_job`: clean one query source and genericize it into templates."""

from dagster import define_asset_job

from fineinstructions_dagster.defs import steps
from fineinstructions_dagster.defs.partitions import query_source_partitions

queries_job = define_asset_job("queries_job", selection=steps.QUERY_STEP, partitions_def=query_source_partitions,
                               description="Clean one query source and genericize it into templates.")
