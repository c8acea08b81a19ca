"""The graph's steps, in the order they first run, written once: each is a job of the code location (what the
UI launches) and a step of `fineinstructions run`."""

from dagster import AssetSelection

from fineinstructions_dagster.defs.documents.assets import FILTER_ASSETS

BENCHMARK_STEP = ["benchmark_ngrams"]  # the benchmark items' n-grams, before anything is decontaminated
QUERY_STEP = ["user_queries", "templates"]  # per query source
BANK_STEP = ["template_bank", "template_index"]
FILTER_STEP = FILTER_ASSETS  # per corpus shard: one pass writes the filtered table, signatures and band rows
DEDUP_STEP = ["duplicate_edges", "document_clusters"]  # every bucket range (EVERY_BUCKET_RANGE), then components
# per corpus shard (judgements and fineinstructions each write their control-pair table beside them)
SHARD_STEP = ["documents", "matches", "instantiations", "judgements", "control_judgements", "fineinstructions",
              "control_outcomes"]
# dbt build over every shard's tables: the dbt_quality models (group `quality`) and their tests (asset checks)
QUALITY_STEP = AssetSelection.groups("quality")
# per shard, one step (pretraining_export) writing both; refuses while a dbt test's latest evaluation did not pass
EXPORT_STEP = ["export_chat", "export_packed"]
REPORT_STEP = ["dataset_report"]
