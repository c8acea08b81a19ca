"""The dbt project `dbt_quality` as Dagster assets: its models are assets in group `quality`, downstream of the
pipeline assets its sources name (`fineinstructions`, `template_bank`, `documents`, ...), and its tests are asset
checks on them. `export_gate` is what `pretraining_export` asks before it writes a shard.

The manifest Dagster needs to build the assets is parsed once (`dbt parse`, a few seconds) and reused: the
code location re-parses only when a file of the dbt project is newer than the manifest."""

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

from dagster import (
    AssetCheckKey,
    AssetExecutionContext,
    AssetKey,
    AssetRecordsFilter,
    AssetSelection,
    DagsterInstance,
    DagsterRun,
    DagsterRunStatus,
    Failure,
    MetadataValue,
    Output,
    RunsFilter,
)
from dagster_dbt import (
    DagsterDbtTranslator,
    DagsterDbtTranslatorSettings,
    DbtCliResource,
    DbtProject,
    dbt_assets,
)

from fineinstructions_dagster.defs.resources import PipelineResource, StorageResource
from fineinstructions_dagster.lib.storage import file_lock
from fineinstructions_dagster.stages.quality import (
    SOURCE_TABLES,
    CheckEvaluation,
    dbt_vars,
    describe_block,
    export_block_reasons,
    summarize_dbt_failures,
)

DBT_PROJECT_DIR = Path(__file__).resolve().parents[3] / "dbt_quality"
QUALITY_GROUP = "quality"
QUALITY_PREFIX = "quality"  # model keys: quality/pairs, quality/templates, ... (never clash with the pipeline's)
QUALITY_PAIRS_KEY = AssetKey([QUALITY_PREFIX, "pairs"])
QUALITY_SELECTION = AssetSelection.groups(QUALITY_GROUP)
INPUTS_AS_OF = "inputs_as_of_storage_id"  # model metadata: the event-log id as of which dbt read its inputs
# The dbt next to this interpreter (the venv's), so that an un-activated venv still finds it.
_VENV_DBT = Path(sys.executable).with_name("dbt")
DBT_EXECUTABLE = str(_VENV_DBT) if _VENV_DBT.exists() else "dbt"
_PROJECT_FILES = ("dbt_project.yml", "profiles.yml", "models", "tests", "macros")


def _newest_source_mtime(project_dir: Path) -> float:
    newest = 0.0
    for name in _PROJECT_FILES:
        path = project_dir / name
        files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()] if path.is_dir() else []
        newest = max([newest, *(f.stat().st_mtime for f in files)])
    return newest


def prepare_manifest(project: DbtProject) -> Path:
    """`dbt parse` into a private folder, then move the manifest (and partial-parse state) into the target folder
    whole, unless the manifest there is newer than every file of the project. Safe to race."""
    manifest = project.manifest_path
    if manifest.exists() and manifest.stat().st_mtime >= _newest_source_mtime(project.project_dir):
        return manifest
    target = project.project_dir / project.target_path
    target.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".parse-", dir=target))
    try:
        env = {**os.environ, "DBT_LOG_PATH": str(tmp), "DBT_SEND_ANONYMOUS_USAGE_STATS": "false"}
        proc = subprocess.run(
            [DBT_EXECUTABLE, "parse", "--quiet", "--project-dir", str(project.project_dir),
             "--profiles-dir", str(project.profiles_dir), "--target-path", str(tmp)],
            env=env, cwd=project.project_dir, capture_output=True, text=True)
        if proc.returncode != 0 or not (tmp / "manifest.json").exists():
            raise RuntimeError(f"dbt parse of {project.project_dir} failed:\n{proc.stdout}\n{proc.stderr}")
        if (tmp / "partial_parse.msgpack").exists():
            os.replace(tmp / "partial_parse.msgpack", target / "partial_parse.msgpack")
        os.replace(tmp / "manifest.json", manifest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return manifest


quality_project = DbtProject(project_dir=DBT_PROJECT_DIR, profiles_dir=DBT_PROJECT_DIR)
prepare_manifest(quality_project)


class QualityTranslator(DagsterDbtTranslator):
    """dbt sources are the pipeline's own assets (same name as the table); models live under `quality/`, in
    group `quality`; each test's description is its check's description."""

    def get_asset_key(self, dbt_resource_props: Mapping[str, Any]) -> AssetKey:
        if dbt_resource_props["resource_type"] == "source":
            return AssetKey(dbt_resource_props["name"])
        return AssetKey([QUALITY_PREFIX, dbt_resource_props["name"]])

    def get_group_name(self, dbt_resource_props: Mapping[str, Any]) -> str | None:
        return QUALITY_GROUP

    def get_asset_check_spec(self, asset_spec, manifest, unique_id, project):  # type: ignore[no-untyped-def]
        spec = super().get_asset_check_spec(asset_spec, manifest, unique_id, project)
        if spec is None or spec.description:
            return spec
        description = (manifest["nodes"].get(unique_id) or {}).get("description") or None
        return spec._replace(description=description) if description else spec


TRANSLATOR = QualityTranslator(settings=DagsterDbtTranslatorSettings(enable_asset_checks=True))


def quality_db_path(root: Path) -> Path:
    """The DuckDB file the models' views live in: beside the data they read, so a later `dbt test` alone (a
    check executed from the UI) sees the views of the last build over the same root."""
    return root / "_quality" / "quality.duckdb"


@contextmanager
def _environ(values: dict[str, str]) -> Iterator[None]:
    """Set environment variables while the dbt subprocess is started (DbtCliResource copies os.environ and has no
    env argument), then restore them. Steps run one at a time per process, so nothing else sees the change."""
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@dbt_assets(manifest=quality_project.manifest_path, project=quality_project, dagster_dbt_translator=TRANSLATOR,
            name="dbt_quality")
def dbt_quality(context: AssetExecutionContext, storage: StorageResource, pipeline: PipelineResource):
    """`dbt build` of the quality project over every shard's Parquet tables: the models are views, the tests
    (asset checks) the data-quality gates `pretraining_export` waits on. Thresholds come from the run's
    PipelineConfig (--vars); the storage root (its local working copy for s3://) from `storage`."""
    store = storage.store()
    # What the tests can have seen: nothing recorded after this point (a shard's pairs materialized while dbt
    # syncs and reads) counts as tested; the export gate compares against this id, not the models' own.
    as_of = context.instance.event_log_storage.get_maximum_record_id() or 0
    store.sync(list(SOURCE_TABLES))  # an s3:// root: bring the working copy up to date first
    db = quality_db_path(store.root)
    variables = dbt_vars(pipeline.config())
    context.log.info(f"dbt build over {store.uri} with vars {variables}")
    dbt = DbtCliResource(project_dir=quality_project, dbt_executable=DBT_EXECUTABLE)
    with file_lock(db.with_name(".lock")):  # one dbt process per root: DuckDB lets one process write a file
        with _environ({"FINEINSTRUCTIONS_ROOT": str(store.root), "FINEINSTRUCTIONS_QUALITY_DB": str(db)}):
            invocation = dbt.cli(["build", "--vars", json.dumps(variables)], context=context, raise_on_error=False)
        for event in invocation.stream():  # every check's evaluation is recorded, failed or not
            if isinstance(event, Output):
                event = event.with_metadata({**event.metadata, INPUTS_AS_OF: as_of})
            yield event
    if not invocation.is_successful():
        try:
            problems = summarize_dbt_failures(invocation.get_artifact("run_results.json")["results"])
        except FileNotFoundError:  # dbt stopped before it ran anything (e.g. a project or profile error)
            problems = []
        if not problems:
            raise invocation.get_error() or Failure("dbt build failed")
        raise Failure(description=f"dbt build found {len(problems)} problem(s):\n" +
                      "\n".join(f"  - {p}" for p in problems),
                      metadata={"dbt_problems": MetadataValue.json(problems)})


QUALITY_CHECK_KEYS: list[AssetCheckKey] = sorted(dbt_quality.check_keys, key=lambda k: k.to_user_string())


def latest_check_evaluations(instance: DagsterInstance,
                             keys: list[AssetCheckKey] = QUALITY_CHECK_KEYS) -> list[CheckEvaluation]:
    """The latest evaluation of each dbt test (asset check) as the instance recorded it, timed by the start of the
    run that evaluated it (dbt read the tables after that; the record's own timestamp has whole seconds only)."""
    records = instance.event_log_storage.get_latest_asset_check_execution_by_key(keys)
    descriptions = {s.key: s.description or "" for s in dbt_quality.check_specs}
    run_starts: dict[str, float | None] = {}
    out = []
    for key in keys:
        rec = records.get(key)
        # None while the latest execution is only planned (in progress, or its run stopped before the test ran)
        evaluation = rec.event.asset_check_evaluation if rec is not None and rec.event is not None else None
        if rec is None or evaluation is None:
            out.append(CheckEvaluation(key.name, None, None, descriptions.get(key, "")))
            continue
        if rec.run_id not in run_starts:
            run = instance.get_run_record_by_id(rec.run_id)
            run_starts[rec.run_id] = run.start_time if run is not None else None
        failed_rows = evaluation.metadata.get("dagster_dbt/failed_row_count")
        target = evaluation.target_materialization_data  # the model materialization this test evaluated
        seq = _inputs_as_of(instance, key.asset_key, target.storage_id) if target is not None else None
        out.append(CheckEvaluation(
            name=key.name, passed=bool(evaluation.passed),
            evaluated_at=run_starts[rec.run_id] or rec.event.timestamp,  # type: ignore[union-attr]
            description=descriptions.get(key, ""),
            failed_rows=int(failed_rows.value) if failed_rows is not None else None,  # type: ignore[arg-type]
            evaluated_seq=seq,
        ))
    return out


def _inputs_as_of(instance: DagsterInstance, key: AssetKey, storage_id: int) -> int:
    """The event-log id as of which the dbt build read its inputs (recorded on the model's materialization);
    the materialization's own id for builds recorded before that metadata existed."""
    found = instance.fetch_materializations(AssetRecordsFilter(asset_key=key, storage_ids=[storage_id]), limit=1)
    if found.records:
        value = found.records[0].asset_materialization.metadata.get(INPUTS_AS_OF)  # type: ignore[union-attr]
        if value is not None:
            return int(value.value)  # type: ignore[arg-type]
    return storage_id


# Each dbt model and the pipeline table it reads (partitioned by shard or not): its tests must be newer than it.
MODEL_INPUTS = {"pairs": ("fineinstructions", True), "documents": ("documents", True), "matches": ("matches", True),
                "instantiations": ("instantiations", True), "judgements": ("judgements", True),
                "templates": ("template_bank", False), "queries": ("user_queries", False)}


def latest_materialization_time(instance: DagsterInstance, key: AssetKey, partition: str | None) -> float | None:
    found = latest_materialization(instance, key, partition)
    return found[1] if found else None


def latest_materialization(instance: DagsterInstance, key: AssetKey,
                           partition: str | None) -> tuple[int, float] | None:
    """(storage id, timestamp) of the latest materialization of the asset (of one partition when given)."""
    result = instance.fetch_materializations(
        AssetRecordsFilter(asset_key=key, asset_partitions=[partition] if partition else None), limit=1)
    return (result.records[0].storage_id, result.records[0].timestamp) if result.records else None


# Only builds that run now: a queued one may wait for the very run slots exports hold (and the gate's staleness
# check already refuses pairs newer than the last build).
_BUILDING = [DagsterRunStatus.STARTING, DagsterRunStatus.STARTED]
QUALITY_JOB = "quality_job"
DBT_STEP = "dbt_quality"  # the step (op) of the dbt build
QUALITY_BUILD_WAIT_S = 900  # how long an export waits for another run's dbt build before refusing


def quality_builds_in_progress(instance: DagsterInstance, own_run_id: str) -> list[str]:
    """Ids of other runs, not finished, that build the quality models (their tests are being rewritten now)."""
    return [r.dagster_run.run_id for r in instance.get_run_records(RunsFilter(statuses=_BUILDING))
            if r.dagster_run.run_id != own_run_id and _builds_quality(instance, r.dagster_run)]


def _builds_quality(instance: DagsterInstance, run: DagsterRun) -> bool:
    """Whether the run executes the dbt step: by job, by asset selection, else by its execution plan (an
    ad-hoc `materialize` run records neither)."""
    if run.job_name == QUALITY_JOB or set(dbt_quality.keys) & set(run.asset_selection or ()):
        return True
    if run.step_keys_to_execute is not None:
        return DBT_STEP in run.step_keys_to_execute
    if not run.execution_plan_snapshot_id:
        return False
    plan = instance.get_execution_plan_snapshot(run.execution_plan_snapshot_id)
    return any(step.key == DBT_STEP for step in plan.steps)


def wait_for_quality_builds(context: AssetExecutionContext, timeout_s: float, poll_s: float = 2.0) -> list[str]:
    """Wait while another run builds the quality tables (its test results are about to change); returns the
    builds still running when the wait ran out."""
    deadline = time.monotonic() + timeout_s
    busy = quality_builds_in_progress(context.instance, context.run_id)
    if busy:
        context.log.info(f"waiting for run(s) {', '.join(busy)} to finish building the quality tables")
    while busy and time.monotonic() < deadline:
        time.sleep(poll_s)
        busy = quality_builds_in_progress(context.instance, context.run_id)
    return busy


def export_gate(context: AssetExecutionContext, shard: str, wait_s: float | None = None) -> dict[str, Any]:
    """Raise Failure naming every dbt test that blocks the export of `shard`: its latest evaluation failed, it
    has none, or it predates the shard's latest `fineinstructions` materialization. Returns metadata otherwise.
    While another run builds the quality tables the gate waits for it, and if it is still building after
    `wait_s`, refuses saying so: a scheduling race is not a data problem."""
    wait_s = QUALITY_BUILD_WAIT_S if wait_s is None else wait_s
    busy = wait_for_quality_builds(context, wait_s)
    evaluations = latest_check_evaluations(context.instance)
    pairs_at = latest_materialization_time(context.instance, AssetKey("fineinstructions"), shard)
    inputs: dict[str, tuple[str, float | None, int | None]] = {}
    for model, (table, by_shard) in MODEL_INPUTS.items():
        found = latest_materialization(context.instance, AssetKey(table), shard if by_shard else None)
        inputs[model] = (f"{table} [{shard}]" if by_shard else table, found[1] if found else None,
                         found[0] if found else None)
    model_of = {k.name: k.asset_key.path[-1] for k in QUALITY_CHECK_KEYS}
    evaluations = [replace(c, reads=inputs[m][0], reads_materialized_at=inputs[m][1], reads_seq=inputs[m][2])
                   if (m := model_of.get(c.name)) in inputs else c for c in evaluations]
    reasons = export_block_reasons(evaluations, pairs_at, shard)
    if reasons and busy:
        raise Failure(description=(
            f"export of shard {shard!r} not run: another run ({', '.join(busy)}) is building the quality tables "
            f"right now and was still building after {wait_s:.0f} s, so the dbt test results are not final; the "
            "data is not known to be wrong. Re-run this export once that run has finished."),
            metadata={"quality_builds_in_progress": MetadataValue.json(busy)})
    if reasons:
        raise Failure(description=describe_block(shard, reasons),
                      metadata={"blocking_dbt_tests": MetadataValue.json([r.test for r in reasons])})
    return {"dbt_tests_passed": len(evaluations)}
