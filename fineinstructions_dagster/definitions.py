"""The code location: every stage's assets and sensors, the resources, and the rules that hold for all."""

from dagster import Definitions, define_asset_job, load_assets_from_modules

from fineinstructions_dagster.defs.documents import assets as documents
from fineinstructions_dagster.defs.documents.sensors import corpus_shard_sensor
from fineinstructions_dagster.defs.export import assets as export
from fineinstructions_dagster.defs.instantiation import assets as instantiation
from fineinstructions_dagster.defs.judging import assets as judging
from fineinstructions_dagster.defs.matching import assets as matching
from fineinstructions_dagster.defs.pairs import assets as pairs
from fineinstructions_dagster.defs.partitions import corpus_shard_partitions, query_source_partitions
from fineinstructions_dagster.defs.queries import assets as queries
from fineinstructions_dagster.defs.queries.sensors import query_source_sensor
from fineinstructions_dagster.defs.resources import build_resources
from fineinstructions_dagster.defs.templates import assets as templates

STAGE_MODULES = [queries, templates, documents, matching, instantiation, judging, pairs, export]

# The graph in six jobs, in the order they must first run; each re-runs one slice.
queries_job = define_asset_job("queries_job", selection=["user_queries", "templates"],
                               partitions_def=query_source_partitions,
                               description="Clean one query source and genericize it into templates.")
template_index_job = define_asset_job("template_index_job", selection=["template_bank", "template_index"],
                                      description="Merge all templates into the bank and index it.")
filter_job = define_asset_job("filter_job", selection=["filtered_documents"], partitions_def=corpus_shard_partitions,
                              description="Stream one corpus shard through the quality filters and sign it.")
dedup_job = define_asset_job("dedup_job", selection=["document_clusters"],
                             description="Exact and near-duplicate clusters across every filtered shard.")
shard_job = define_asset_job("shard_job", partitions_def=corpus_shard_partitions,
                             selection=["documents", "matches", "instantiations", "judgements", "fineinstructions",
                                        "pretraining_export"],
                             description="Documents -> matches -> instantiations -> judgements -> pairs -> export "
                                         "for a shard.")
report_job = define_asset_job("report_job", selection=["dataset_report"], description="Rebuild the report.")

defs = Definitions(
    assets=load_assets_from_modules(STAGE_MODULES),
    jobs=[queries_job, template_index_job, filter_job, dedup_job, shard_job, report_job],
    sensors=[corpus_shard_sensor, query_source_sensor],
    resources=build_resources(),
)
