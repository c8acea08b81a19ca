"""Run the whole asset graph in one process, in dependency order, as ordinary Dagster runs.

Used by `fineinstructions run` (and so `make demo` / `make run`): one process means one LLM engine,
loaded once and reused by every partition; one failed partition fails only what depends on it. The runs
land in the Dagster instance ($DAGSTER_HOME), so `dagster dev` shows them afterwards.
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Callable
from dataclasses import dataclass, field

from dagster import AssetSelection, DagsterInstance, ExecuteInProcessResult, load_assets_from_modules, materialize

from fineinstructions_dagster.defs.inputs import corpus_shards, query_sources
from fineinstructions_dagster.defs.partitions import corpus_shard_partitions, query_source_partitions
from fineinstructions_dagster.defs.resources import build_resources, env_value
from fineinstructions_dagster.defs.run_health import release_dead_runs, runner_tags
from fineinstructions_dagster.llm.engines import hold_engines

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
class StepFailure:
    step: str
    partition: str | None
    run_id: str
    error: str

    def describe(self) -> str:
        where = f"{self.step} [{self.partition}]" if self.partition else self.step
        return f"{where} (run {self.run_id[:8]}): {self.error}"


@dataclass
class PipelineRun:
    sources: list[str] = field(default_factory=list)
    shards: list[str] = field(default_factory=list)
    run_ids: dict[str, str] = field(default_factory=dict)
    failures: list[StepFailure] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # steps not run because something they need failed
    released_runs: list[str] = field(default_factory=list)  # dead runs released at start

    @property
    def ok(self) -> bool:
        return not self.failures


def _failure_message(result: ExecuteInProcessResult) -> str:
    for event in result.all_events:
        if event.is_step_failure and event.step_failure_data is not None:
            err = event.step_failure_data.error
            msg = (err.cause or err).message if err is not None else "step failed"
            return f"{event.step_key}: " + " ".join(msg.split())[:500]
    return "run failed"


def run_pipeline(instance: DagsterInstance, log: Callable[[str], None] = print,
                 console_level: str = "WARNING") -> PipelineRun:
    """Materialize every asset for every input. A failed partition does not stop the others: everything
    that does not depend on it still runs, and `PipelineRun.failures` says what failed and why. Dagster's
    step events stay in the instance (and the UI); the console shows warnings and errors only unless
    `console_level` says otherwise."""
    from fineinstructions_dagster.definitions import STAGE_MODULES

    assets = load_assets_from_modules(STAGE_MODULES)
    resources = build_resources()
    sources = sorted(query_sources(env_value("FINEINSTRUCTIONS_QUERIES")))
    shards = sorted(corpus_shards(env_value("FINEINSTRUCTIONS_CORPUS")))
    if not sources:
        raise FileNotFoundError(f"no query files in {env_value('FINEINSTRUCTIONS_QUERIES')}")
    if not shards:
        raise FileNotFoundError(f"no corpus shard files in {env_value('FINEINSTRUCTIONS_CORPUS')}")
    out = PipelineRun(sources, shards)
    # A run of an earlier, killed runner still holds its `gpu` slot: free it, or every LLM step waits forever.
    out.released_runs = release_dead_runs(instance)
    for run_id in out.released_runs:
        log(f"released run {run_id[:8]}: its process is gone (marked failed, pool slots freed)")
    # What the sensors do on a tick: one dynamic partition per input.
    instance.add_dynamic_partitions(query_source_partitions.name, sources)  # type: ignore[arg-type]
    instance.add_dynamic_partitions(corpus_shard_partitions.name, shards)  # type: ignore[arg-type]

    quiet = console_level.upper() in ("WARNING", "ERROR", "CRITICAL")
    tags = runner_tags()

    def step(name: str, selection: list[str] | AssetSelection, partition: str | None = None,
             mute_stdout: bool = False) -> bool:
        log(f"-> {name}" + (f" [{partition}]" if partition else ""))
        # dagster-dbt echoes every dbt log line to stdout; on a quiet console a failed build still says which
        # tests failed (the step's Failure), and the checks are in the instance.
        muted = contextlib.redirect_stdout(io.StringIO()) if mute_stdout and quiet else contextlib.nullcontext()
        with muted:
            result = materialize(assets, selection=selection, partition_key=partition, instance=instance,
                                 resources=resources, tags={"fineinstructions/step": name, **tags},
                                 raise_on_error=False,
                                 run_config={"loggers": {"console": {"config": {"log_level": console_level}}}})
        out.run_ids[f"{name}:{partition}" if partition else name] = result.run_id
        if not result.success:
            failure = StepFailure(name, partition, result.run_id, _failure_message(result))
            out.failures.append(failure)
            log(f"   FAILED {failure.describe()}")
        return result.success

    def skip(name: str, partition: str | None, because: str) -> None:
        out.skipped.append(f"{name} [{partition}]" if partition else name)
        log(f"-> {name}" + (f" [{partition}]" if partition else "") + f": skipped ({because} failed)")

    with hold_engines():  # one model load for the whole graph, closed at the end whatever happens
        templated = [source for source in sources if step("queries", QUERY_STEP, source)]
        indexed = bool(templated) and step("template_index", BANK_STEP)
        filtered = [shard for shard in shards if step("filter", FILTER_STEP, shard)]
        deduped = bool(filtered) and step("dedup", DEDUP_STEP)
        paired: list[str] = []
        for shard in shards:
            if shard not in filtered or not deduped or not indexed:
                skip("shard", shard, "its filter step" if shard not in filtered else
                     "the dedup step" if not deduped else "the template index")
            elif step("shard", SHARD_STEP, shard):
                paired.append(shard)
        tested = bool(paired) and step("quality", QUALITY_STEP, mute_stdout=True)
        for shard in paired:
            if tested:
                step("export", EXPORT_STEP, shard)
            else:
                skip("export", shard, "the quality step")
        step("report", REPORT_STEP)
    return out
