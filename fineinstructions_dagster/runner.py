"""Run the whole asset graph in one process, in dependency order, as ordinary Dagster runs.

Used by `fineinstructions run` (and so `make demo` / `make run`): one process means one LLM engine,
loaded once and reused by every partition; one failed partition fails only what depends on it. The runs
land in the Dagster instance ($DAGSTER_HOME), so `dagster dev` shows them afterwards.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field

from dagster import (
    AssetSelection,
    DagsterInstance,
    DagsterRunStatus,
    ExecuteInProcessResult,
    RunsFilter,
    materialize,
)

from fineinstructions_dagster.defs.inputs import corpus_shards, query_sources
from fineinstructions_dagster.defs.observations import CORPUS_FILES, QUERY_FILES, observe_inputs
from fineinstructions_dagster.defs.partitions import (
    EVERY_BUCKET_RANGE,
)
from fineinstructions_dagster.defs.resources import PipelineResource, build_resources, env_value
from fineinstructions_dagster.defs.run_health import release_dead_runs, runner_tags
from fineinstructions_dagster.defs.steps import (
    BANK_STEP,
    DEDUP_STEP,
    EXPORT_STEP,
    FILTER_STEP,
    QUALITY_STEP,
    QUERY_STEP,
    REPORT_STEP,
    SHARD_STEP,
)
from fineinstructions_dagster.lib.formats import input_versions
from fineinstructions_dagster.lib.storage import UNPARTITIONED
from fineinstructions_dagster.llm.engines import hold_engines

# The steps, as the jobs define them (re-exported: tests and benchmarks import them from here).
__all__ = ["BANK_STEP", "DEDUP_STEP", "EXPORT_STEP", "FILTER_STEP", "QUALITY_STEP", "QUERY_STEP", "REPORT_STEP",
           "SHARD_STEP", "PipelineRun", "run_pipeline"]


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
    current: list[str] = field(default_factory=list)  # steps not re-run: a run already made them from these inputs

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


STEP_KEY_TAG = "fineinstructions/step_key"


def _fingerprint(*parts: object) -> str:
    return hashlib.sha256(json.dumps(parts, default=str, sort_keys=True).encode()).hexdigest()[:20]


def _input_files(files: list[str]) -> list[tuple[str, int, str]]:
    """(path, size, version) of input files, local or s3://: what tells that a source or shard changed."""
    versions = input_versions(files)
    return [(path, *versions[path]) for path in sorted(files)]


def _settings_fingerprint(resources: dict) -> str:
    """The configuration every step depends on: the profile's PipelineConfig and the environment that picks
    models, backends, inputs and storage (a changed threshold or model re-runs the steps it touches)."""
    import fineinstructions_dagster

    env = {k: v for k, v in os.environ.items()
           if k.startswith("FINEINSTRUCTIONS_") and k != "FINEINSTRUCTIONS_PROGRESS"}
    config = resources["pipeline"].process_config_and_initialize().config()
    return _fingerprint(repr(config), env, getattr(fineinstructions_dagster, "__version__", ""))


def run_pipeline(instance: DagsterInstance, log: Callable[[str], None] = print,
                 console_level: str = "WARNING", force: bool = False,
                 pipeline_overrides: dict[str, object] | None = None) -> PipelineRun:
    """Materialize every asset for every input. A failed partition does not stop the others: everything
    that does not depend on it still runs, and `PipelineRun.failures` says what failed and why. Dagster's
    step events stay in the instance (and the UI); the console shows warnings and errors only unless
    `console_level` says otherwise.

    Each step carries a key: a hash of the settings, its own input files and the keys of the steps it reads
    (and, for a shard's chain, its dedup removal list). A step whose key a successful run already carries, and
    whose output is still there, is not run again (`force` runs everything): adding a shard runs that shard's
    filter, the dedup step and that shard's chain; the other shards' pairs and exports stay as they are.
    `pipeline_overrides`: PipelineResource fields (thresholds, control_share, ...), as the launchpad sets them."""
    from fineinstructions_dagster.definitions import ASSETS

    assets = list(ASSETS)
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
    # What the sensors do on a tick: one dynamic partition per input, and the data versions of changed ones
    # (what the UI's staleness reads), from the listing above.
    observe_inputs(instance, {QUERY_FILES: found_sources, CORPUS_FILES: found_shards})

    quiet = console_level.upper() in ("WARNING", "ERROR", "CRITICAL")
    tags = runner_tags()
    store = resources["storage"].process_config_and_initialize().store()  # its EnvVars resolved
    settings = _settings_fingerprint(resources)

    def made_by_a_run(key: str, outputs: list[tuple[str, str | None]]) -> str | None:
        """The run that already made this step from the same inputs, if its outputs are still there."""
        if force:
            return None
        records = instance.get_run_records(RunsFilter(tags={STEP_KEY_TAG: key}, statuses=[DagsterRunStatus.SUCCESS]),
                                           limit=1)
        if not records:
            return None
        for table, partition in outputs:
            there = (store.read_json(table) is not None if table.endswith(".json")
                     else store.exists(table, partition or UNPARTITIONED))
            if not there:
                return None
        return records[0].dagster_run.run_id

    def step(name: str, selection: list[str] | AssetSelection, partition: str | None = None,
             mute_stdout: bool = False, extra_tags: dict[str, str] | None = None, key: str | None = None,
             outputs: list[tuple[str, str | None]] = ()) -> bool:
        where = f"{name}" + (f" [{partition}]" if partition else "")
        done = made_by_a_run(key, list(outputs)) if key else None
        if done is not None:
            out.current.append(where)
            out.run_ids[f"{name}:{partition}" if partition else name] = done
            log(f"-> {where}: up to date (run {done[:8]})")
            return True
        log(f"-> {where}")
        if key:
            extra_tags = {**(extra_tags or {}), STEP_KEY_TAG: key}
        # dagster-dbt echoes every dbt log line to stdout; on a quiet console a failed build still says which
        # tests failed (the step's Failure), and the checks are in the instance.
        muted = contextlib.redirect_stdout(io.StringIO()) if mute_stdout and quiet else contextlib.nullcontext()
        with muted:
            result = materialize(assets, selection=selection, partition_key=partition, instance=instance,
                                 resources=resources,
                                 tags={"fineinstructions/step": name, "fineinstructions/root": root_uri, **tags,
                                       **(extra_tags or {})},
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

    def removal_list(shard: str) -> str:
        """What the shard's chain reads from dedup: its removal list, by content."""
        if not store.exists("document_clusters", shard):
            return ""
        return hashlib.sha256(store.path("document_clusters", shard).read_bytes()).hexdigest()[:20]

    with hold_engines():  # one model load for the whole graph, closed at the end whatever happens
        qkeys = {s: _fingerprint(settings, "queries", s, _input_files(found_sources[s])) for s in sources}
        templated = [s for s in sources
                     if step("queries", QUERY_STEP, s, key=qkeys[s], outputs=[("templates", s)])]
        index_key = _fingerprint(settings, "index", [qkeys[s] for s in templated])
        indexed = bool(templated) and step("template_index", BANK_STEP, key=index_key,
                                           outputs=[("template_bank", None)])
        fkeys = {s: _fingerprint(settings, "filter", s, _input_files(found_shards[s])) for s in shards}
        filtered = [s for s in shards if step("filter", FILTER_STEP, s, key=fkeys[s],
                                              outputs=[("filtered_documents", s), ("document_signatures", s)])]
        deduped = bool(filtered) and step("dedup", DEDUP_STEP, extra_tags=EVERY_BUCKET_RANGE,
                                          key=_fingerprint(settings, "dedup", [fkeys[s] for s in filtered]),
                                          outputs=[("document_clusters/_state.json", None)])
        paired: list[str] = []
        skeys: dict[str, str] = {}
        for shard in shards:
            if shard not in filtered or not deduped or not indexed:
                skip("shard", shard, "its filter step" if shard not in filtered else
                     "the dedup step" if not deduped else "the template index")
                continue
            skeys[shard] = _fingerprint(settings, "shard", fkeys[shard], index_key, removal_list(shard))
            if step("shard", SHARD_STEP, shard, key=skeys[shard], outputs=[("fineinstructions", shard)]):
                paired.append(shard)
        quality_key = _fingerprint(settings, "quality", [skeys[s] for s in paired], index_key)
        tested = bool(paired) and step("quality", QUALITY_STEP, mute_stdout=True, key=quality_key)
        for shard in paired:
            if tested:
                # an export depends on its own shard's pairs (the gate needs the dbt build to have passed)
                step("export", EXPORT_STEP, shard, key=_fingerprint(settings, "export", skeys[shard]),
                     outputs=[("export_chat", shard)])
            else:
                skip("export", shard, "the quality step")
        step("report", REPORT_STEP, key=_fingerprint(settings, "report", quality_key, sorted(out.run_ids.values())))
    return out
