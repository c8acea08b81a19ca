"""The code location: every stage's assets and sensors, the resources, and the rules that hold for all."""

from dagster import (
    AssetSelection,
    AutomationConditionSensorDefinition,
    DefaultSensorStatus,
    Definitions,
    define_asset_job,
    load_assets_from_modules,
)

from fineinstructions_dagster.defs import steps
from fineinstructions_dagster.defs.documents import assets as documents
from fineinstructions_dagster.defs.documents.sensors import corpus_shard_sensor
from fineinstructions_dagster.defs.export import assets as export
from fineinstructions_dagster.defs.instantiation import assets as instantiation
from fineinstructions_dagster.defs.judging import assets as judging
from fineinstructions_dagster.defs.lineage.jobs import lineage_job
from fineinstructions_dagster.defs.matching import assets as matching
from fineinstructions_dagster.defs.pairs import assets as pairs
from fineinstructions_dagster.defs.partitions import corpus_shard_partitions, query_source_partitions
from fineinstructions_dagster.defs.quality import assets as quality
from fineinstructions_dagster.defs.queries import assets as queries
from fineinstructions_dagster.defs.queries.sensors import query_source_sensor
from fineinstructions_dagster.defs.resources import build_resources
from fineinstructions_dagster.defs.templates import assets as templates

STAGE_MODULES = [queries, templates, documents, matching, instantiation, judging, pairs, export, quality]

# The graph's steps as jobs, in the order they must first run (defs/steps.py; `fineinstructions run` runs the
# same selections); each re-runs one slice.
queries_job = define_asset_job("queries_job", selection=steps.QUERY_STEP,
                               partitions_def=query_source_partitions,
                               description="Clean one query source and genericize it into templates.")
template_index_job = define_asset_job("template_index_job", selection=steps.BANK_STEP,
                                      description="Merge all templates into the bank and index it.")
filter_job = define_asset_job("filter_job", selection=steps.FILTER_STEP, partitions_def=corpus_shard_partitions,
                              description="Stream one corpus shard through the quality filters; write its "
                                          "MinHash signatures and LSH band rows.")
dedup_job = define_asset_job("dedup_job", selection=steps.DEDUP_STEP,
                             description="Exact and near duplicates across every filtered shard: launch it for "
                                         "every bucket range (a backfill spreads the ranges over runs), the "
                                         "components and per-shard removal lists follow.")
shard_job = define_asset_job("shard_job", partitions_def=corpus_shard_partitions,
                             selection=steps.SHARD_STEP,
                             description="Documents -> matches -> instantiations -> judgements -> pairs for a shard.")
quality_job = define_asset_job("quality_job", selection=steps.QUALITY_STEP,
                               description="dbt build of dbt_quality over every shard: the data-quality tests "
                                           "(blocking asset checks) that gate the export.")
export_job = define_asset_job("export_job", selection=steps.EXPORT_STEP, partitions_def=corpus_shard_partitions,
                              description="Export a shard for pre-training; refuses while a dbt test's latest "
                                          "evaluation did not pass.")
report_job = define_asset_job("report_job", selection=steps.REPORT_STEP, description="Rebuild the report.")

# Declarative automation (defs/automation.py) from a new shard's filter to its export: stopped by default, so
# that nothing runs by itself on a laptop until asked; turn it on in the UI (Automation) or with
# `dagster sensor start automation_sensor`. It emits backfills, so the backfill policies batch its requests.
automation_sensor = AutomationConditionSensorDefinition(
    "automation_sensor", target=AssetSelection.all(), default_status=DefaultSensorStatus.STOPPED,
    description="Runs what a new or changed input makes due: dedup, the shard's chain, the bank and index, the "
                "dbt build, the export once the dbt tests passed, the report.")

defs = Definitions(
    assets=load_assets_from_modules(STAGE_MODULES),
    jobs=[queries_job, template_index_job, filter_job, dedup_job, shard_job, report_job, lineage_job,
          quality_job, export_job],
    sensors=[corpus_shard_sensor, query_source_sensor, automation_sensor],
    resources=build_resources(),
)
