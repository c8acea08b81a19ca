"""`quality_job`: the dbt build whose tests gate the export."""

from dagster import define_asset_job

from fineinstructions_dagster.defs import steps

quality_job = define_asset_job("quality_job", selection=steps.QUALITY_STEP,
                               description="dbt build of dbt_quality over every shard: the data-quality tests "
                                           "(blocking asset checks) that gate the export.")
