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

from dagster import (
    AssetKey,
    AssetRecordsFilter,
    AssetSelection,
    DagsterInstance,
    ExecuteInProcessResult,
    materialize,
)
from dagster._core.definitions.events import AssetKeyPartitionKey

from fineinstructions_dagster.defs.inputs import corpus_shards, query_sources
from fineinstructions_dagster.defs.observations import CORPUS_FILES, QUERY_FILES, observe_inputs
from fineinstructions_dagster.defs.partitions import (
    EVERY_BUCKET_RANGE,
)
from fineinstructions_dagster.defs.resources import PipelineResource, build_resources, env_value
from fineinstructions_dagster.defs.run_health import release_dead_runs, runner_tags
from fineinstructions_dagster.defs.settings import observe_settings
from fineinstructions_dagster.defs.staleness import partitions_of, stale_reasons
from fineinstructions_dagster.defs.steps import (
    BANK_STEP,
    BENCHMARK_STEP,
    DEDUP_STEP,
    EXPORT_STEP,
    FILTER_STEP,
    QUALITY_STEP,
    QUERY_STEP,
    REPORT_STEP,
    SHARD_STEP,
)
from fineinstructions_dagster.lib.storage import UNPARTITIONED
from fineinstructions_dagster.llm.engines import hold_engines

# The steps, as the jobs define them (re-exported: tests and benchmarks import them from here).
__all__ = ["BANK_STEP", "BENCHMARK_STEP", "DEDUP_STEP", "EXPORT_STEP", "FILTER_STEP", "QUALITY_STEP", "QUERY_STEP",
           "REPORT_STEP", "SHARD_STEP", "PipelineRun", "run_pipeline"]


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
    current: list[str] = field(default_factory=list)  # steps not re-run: Dagster calls every asset of them fresh

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


def _latest_run(instance: DagsterInstance, key: AssetKey, partition: str | None) -> str | None:
    """The run of the latest materialization of `key` (in `partition`): what the UI shows as its current one."""
    records = instance.fetch_materializations(
        AssetRecordsFilter(asset_key=key, asset_partitions=[partition] if partition else None), limit=1).records
    return records[0].run_id if records else None


def run_pipeline(instance: DagsterInstance, log: Callable[[str], None] = print,
                 console_level: str = "WARNING", force: bool = False,
                 pipeline_overrides: dict[str, object] | None = None) -> PipelineRun:
    """Materialize, in dependency order, what Dagster's staleness says is due. A failed partition does not stop
    the others: everything that does not depend on it still runs, and `PipelineRun.failures` says what failed and
    why. Dagster's step events stay in the instance (and the UI); the console shows warnings and errors only unless
    `console_level` says otherwise.

    The inputs and each stage's settings are observed first (new partitions, replaced files, changed settings get
    new data versions, as the sensors record them); then each step runs from its first asset that Dagster calls
    missing or stale (a new code version, a new data version upstream) or whose output is gone from the storage
    root; a step with none is reported `up to date` with the run that made its current materialization, the one
    the UI shows. So adding a shard runs that shard's filter, the dedup step and that shard's chain; a changed gate
    re-runs the pairs step of every shard and what follows; `force` runs everything.
    `pipeline_overrides`: PipelineResource fields (thresholds, control_share, ...), as the launchpad sets them."""
    from fineinstructions_dagster.definitions import ASSETS, defs

    assets = list(ASSETS)
    graph = defs.resolve_asset_graph()
    resources = build_resources()
    if pipeline_overrides:
        resources["pipeline"] = PipelineResource(**pipeline_overrides)  # type: ignore[arg-type]
    root_uri = env_value("FINEINSTRUCTIONS_ROOT")  # on every run: the Dagster history says which root it used
    found_sources = query_sources(env_value("FINEINSTRUCTIONS_QUERIES"))  # listed once (an S3 listing is slow)
    found_shards = corpus_shards(env_value("FINEINSTRUCTIONS_CORPUS"))
    sources, shards = sorted(found_sources), sorted(found_shards)
    if not sources:
        raise FileNotFoundError(f"no query files in {env_value('FINEINSTRUCTIONS_QUERIES')}")
    if not shards:
        raise FileNotFoundError(f"no corpus shard files in {env_value('FINEINSTRUCTIONS_CORPUS')}")
    out = PipelineRun(sources, shards)
    # A run of an earlier, killed runner still holds its `gpu` slot: free it, or every LLM step waits forever.
    out.released_runs = release_dead_runs(instance)
    for run_id in out.released_runs:
        log(f"released run {run_id[:8]}: its process is gone (marked failed, pool slots freed)")
    # What the sensors do on a tick: one dynamic partition per input, and the data versions of changed inputs
    # (from the listing above) and of changed settings (these resources', overrides included).
    observe_inputs(instance, {QUERY_FILES: found_sources, CORPUS_FILES: found_shards})
    for key in observe_settings(instance, resources):
        log(f"settings: {key} changed")

    quiet = console_level.upper() in ("WARNING", "ERROR", "CRITICAL")
    tags = runner_tags()
    store = resources["storage"].process_config_and_initialize().store()  # its EnvVars resolved

    def due(selection: list[str] | AssetSelection, partition: str | None, outputs: list[tuple[str, str | None]],
            whole: bool) -> tuple[list[str] | AssetSelection | None, str]:
        """The part of the step to run (from its first due asset on, a multi-asset whole; all of it if `whole`)
        and why; None: nothing."""
        names = selection if isinstance(selection, list) else sorted(
            k.to_user_string() for k in selection.resolve(graph))
        if force:
            return selection, "--force"
        keys = {n: AssetKey.from_user_string(n) for n in names}
        wanted = {AssetKeyPartitionKey(keys[n], p): n for n in names
                  for p in ([partition] if partition and graph.get(keys[n]).partitions_def
                            else partitions_of(graph, keys[n]))}
        reasons = stale_reasons(instance, graph, wanted)
        # fresh to Dagster is not enough when the storage root was wiped under it: then all of the step again
        gone = [t for t, p in outputs if not (store.read_json(t) is not None if t.endswith(".json")
                                              else store.exists(t, p or UNPARTITIONED))]
        if not reasons:
            return (selection, f"{gone[0]} is gone from the storage root") if gone else (None, "")
        first_ap = min(reasons, key=lambda ap: names.index(wanted[ap]))
        why = f"{wanted[first_ap]}: {reasons[first_ap]}"
        if whole or gone or not isinstance(selection, list):
            return selection, why
        first = names.index(wanted[first_ap])
        # a multi-asset's outputs are materialized together: from its first output on
        together = {k.to_user_string() for k in defs.resolve_assets_def(keys[names[first]]).keys}
        first = min(i for i, n in enumerate(names) if n in together or i >= first)
        return names[first:], why

    def step(name: str, selection: list[str] | AssetSelection, partition: str | None = None,
             mute_stdout: bool = False, extra_tags: dict[str, str] | None = None,
             outputs: list[tuple[str, str | None]] = (), whole: bool = False) -> bool:
        where = f"{name}" + (f" [{partition}]" if partition else "")
        run_key = f"{name}:{partition}" if partition else name
        todo, why = due(selection, partition, list(outputs), whole)
        if todo is None:
            first = selection[0] if isinstance(selection, list) else sorted(selection.resolve(graph))[0]
            done = _latest_run(instance, AssetKey(first) if isinstance(first, str) else first, partition) or ""
            out.current.append(where)
            out.run_ids[run_key] = done
            log(f"-> {where}: up to date (run {done[:8]})")
            return True
        part = "" if todo == selection else f" {', '.join(todo)};"  # type: ignore[arg-type]
        log(f"-> {where}:{part} {why}")
        # dagster-dbt echoes every dbt log line to stdout; on a quiet console a failed build still says which
        # tests failed (the step's Failure), and the checks are in the instance.
        muted = contextlib.redirect_stdout(io.StringIO()) if mute_stdout and quiet else contextlib.nullcontext()
        with muted:
            result = materialize(assets, selection=todo, partition_key=partition, instance=instance,
                                 resources=resources,
                                 tags={"fineinstructions/step": name, "fineinstructions/root": root_uri, **tags,
                                       **(extra_tags or {})},
                                 raise_on_error=False,
                                 run_config={"loggers": {"console": {"config": {"log_level": console_level}}}})
        out.run_ids[run_key] = result.run_id
        if not result.success:
            failure = StepFailure(name, partition, result.run_id, _failure_message(result))
            out.failures.append(failure)
            log(f"   FAILED {failure.describe()}")
        return result.success

    def skip(name: str, partition: str | None, because: str) -> None:
        out.skipped.append(f"{name} [{partition}]" if partition else name)
        log(f"-> {name}" + (f" [{partition}]" if partition else "") + f": skipped ({because} failed)")

    with hold_engines():  # one model load for the whole graph, closed at the end whatever happens
        # first, so the decontaminating steps read its index (failed: each builds it from the files, or fails)
        step("benchmarks", BENCHMARK_STEP, outputs=[("benchmark_ngrams", None)])
        templated = [s for s in sources if step("queries", QUERY_STEP, s, outputs=[("templates", s)])]
        indexed = bool(templated) and step("template_index", BANK_STEP, outputs=[("template_bank", None)])
        filtered = [s for s in shards if step("filter", FILTER_STEP, s,
                                              outputs=[("filtered_documents", s), ("document_signatures", s)])]
        # whole: one run over every bucket range, then the components (its range tags need the ranged asset)
        deduped = bool(filtered) and step("dedup", DEDUP_STEP, extra_tags=EVERY_BUCKET_RANGE, whole=True,
                                          outputs=[("document_clusters/_state.json", None)])
        paired: list[str] = []
        for shard in shards:
            if shard not in filtered or not deduped or not indexed:
                skip("shard", shard, "its filter step" if shard not in filtered else
                     "the dedup step" if not deduped else "the template index")
                continue
            if step("shard", SHARD_STEP, shard, outputs=[("fineinstructions", shard)]):
                paired.append(shard)
        tested = bool(paired) and step("quality", QUALITY_STEP, mute_stdout=True)
        for shard in paired:
            if tested:
                # an export depends on its own shard's pairs (the gate needs the dbt build to have passed)
                step("export", EXPORT_STEP, shard, outputs=[("export_chat", shard)])
            else:
                skip("export", shard, "the quality step")
        step("report", REPORT_STEP)
    return out
