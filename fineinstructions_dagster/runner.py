"""Run the whole asset graph in one process, in dependency order, as ordinary Dagster runs.

Used by `fineinstructions run` (and so `make demo` / `make run`): one process means one LLM engine,
loaded once and reused by every partition. The runs land in the Dagster instance ($DAGSTER_HOME),
so `dagster dev` shows them afterwards.
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Callable
from dataclasses import dataclass, field

from dagster import AssetSelection, DagsterInstance, load_assets_from_modules, materialize

from fineinstructions_dagster.defs.inputs import corpus_shards, query_sources
from fineinstructions_dagster.defs.partitions import corpus_shard_partitions, query_source_partitions
from fineinstructions_dagster.defs.resources import build_resources, env_value

QUERY_STEP = ["user_queries", "templates"]
BANK_STEP = ["template_bank", "template_index"]
FILTER_STEP = ["filtered_documents"]
DEDUP_STEP = ["document_clusters"]
SHARD_STEP = ["documents", "matches", "instantiations", "judgements", "fineinstructions"]
# dbt build over every shard's tables: the dbt_quality models (group `quality`) and their tests (asset checks)
QUALITY_STEP = AssetSelection.groups("quality")
EXPORT_STEP = ["pretraining_export"]  # per shard; refuses to run unless every dbt test passed on the current pairs
REPORT_STEP = ["dataset_report"]


@dataclass
class PipelineRun:
    sources: list[str] = field(default_factory=list)
    shards: list[str] = field(default_factory=list)
    run_ids: dict[str, str] = field(default_factory=dict)


def run_pipeline(instance: DagsterInstance, log: Callable[[str], None] = print,
                 console_level: str = "WARNING") -> PipelineRun:
    """Materialize every asset for every input. Dagster's step events stay in the instance (and the
    UI); the console shows warnings and errors only unless `console_level` says otherwise."""
    from fineinstructions_dagster.definitions import STAGE_MODULES

    assets = load_assets_from_modules(STAGE_MODULES)
    resources = build_resources()
    sources = sorted(query_sources(env_value("FINEINSTRUCTIONS_QUERIES")))
    shards = sorted(corpus_shards(env_value("FINEINSTRUCTIONS_CORPUS")))
    if not sources:
        raise FileNotFoundError(f"no query files in {env_value('FINEINSTRUCTIONS_QUERIES')}")
    if not shards:
        raise FileNotFoundError(f"no corpus shard files in {env_value('FINEINSTRUCTIONS_CORPUS')}")
    # What the sensors do on a tick: one dynamic partition per input.
    instance.add_dynamic_partitions(query_source_partitions.name, sources)  # type: ignore[arg-type]
    instance.add_dynamic_partitions(corpus_shard_partitions.name, shards)  # type: ignore[arg-type]
    out = PipelineRun(sources, shards)

    quiet = console_level.upper() in ("WARNING", "ERROR", "CRITICAL")

    def step(name: str, selection: list[str] | AssetSelection, partition: str | None = None,
             mute_stdout: bool = False) -> None:
        log(f"-> {name}" + (f" [{partition}]" if partition else ""))
        # dagster-dbt echoes every dbt log line to stdout; on a quiet console a failed build still says which
        # tests failed (the step's Failure), and the checks are in the instance.
        muted = contextlib.redirect_stdout(io.StringIO()) if mute_stdout and quiet else contextlib.nullcontext()
        with muted:
            result = materialize(assets, selection=selection, partition_key=partition, instance=instance,
                                 resources=resources, tags={"fineinstructions/step": name},
                                 run_config={"loggers": {"console": {"config": {"log_level": console_level}}}})
        out.run_ids[f"{name}:{partition}" if partition else name] = result.run_id

    for source in sources:
        step("queries", QUERY_STEP, source)
    step("template_index", BANK_STEP)
    for shard in shards:
        step("filter", FILTER_STEP, shard)
    step("dedup", DEDUP_STEP)
    for shard in shards:
        step("shard", SHARD_STEP, shard)
    step("quality", QUALITY_STEP, mute_stdout=True)
    for shard in shards:
        step("export", EXPORT_STEP, shard)
    step("report", REPORT_STEP)
    return out
