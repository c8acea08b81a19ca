"""`template_index_job`: the bank of every source's templates, and its index."""

from dagster import define_asset_job

from fineinstructions_dagster.defs import steps

template_index_job = define_asset_job("template_index_job", selection=steps.BANK_STEP,
                                      description="Merge all templates into the bank and index it.")
