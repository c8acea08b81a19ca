"""The dbt project `dbt_quality` as Dagster assets: its models are assets in group `quality`, downstream of the
pipeline assets its sources name (`fineinstructions`, `template_bank`, `documents`, ...), and its tests are
blocking asset checks on them: `pretraining_export` depends on the models, so a run that builds them stops
before the export when a test fails, and automation waits for them to pass (defs/automation.py).

The manifest is made by `dbt parse` at set-up (scripts/setup.sh, the Dockerfile); under `dagster dev` DbtProject
re-parses on load. Loading the location runs nothing else."""

import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from dagster import (
    AssetCheckKey,
    AssetExecutionContext,
    AssetKey,
    AssetSelection,
    AssetSpec,
    DataVersion,
    Failure,
    MetadataValue,
    Output,
)
from dagster_dbt import (
    DagsterDbtTranslator,
    DagsterDbtTranslatorSettings,
    DbtCliResource,
    DbtProject,
    DbtProjectPreparer,
    dbt_assets,
)

from fineinstructions_dagster.defs.automation import over_every_partition, with_its_asset
from fineinstructions_dagster.defs.observations import FIXED_DATA_VERSION_TAG
from fineinstructions_dagster.defs.resources import PipelineResource, StorageResource
from fineinstructions_dagster.defs.steps import SHARD_STEP
from fineinstructions_dagster.lib.storage import file_lock
from fineinstructions_dagster.stages.quality import (
    SOURCE_TABLES,
    dbt_vars,
    describe_failed_checks,
    summarize_dbt_failures,
)

DBT_PROJECT_DIR = Path(__file__).resolve().parents[3] / "dbt_quality"
QUALITY_GROUP = "quality"
QUALITY_PREFIX = "quality"  # model keys: quality/pairs, quality/templates, ... (never clash with the pipeline's)
QUALITY_PAIRS_KEY = AssetKey([QUALITY_PREFIX, "pairs"])
QUALITY_SELECTION = AssetSelection.groups(QUALITY_GROUP)
VIEW_VERSION = DataVersion("a view over its tables")
SHARD_TABLE_KEYS = {AssetKey(t) for t in SOURCE_TABLES if t in SHARD_STEP}  # the dbt sources a shard's chain writes
_VENV_DBT = Path(sys.executable).with_name("dbt")  # the venv's dbt, also when the venv is not on PATH
DBT_EXECUTABLE = str(_VENV_DBT) if _VENV_DBT.exists() else "dbt"
_PROJECT_FILES = ("dbt_project.yml", "profiles.yml", "models", "tests", "macros")


class DevPreparer(DbtProjectPreparer):
    """Under `dagster dev` only, parse the project again when a file of it is newer than the manifest (Dagster's
    default preparer would call a `dbt` on PATH, and the venv may not be there). The parse writes to a private
    folder and the manifest is moved in whole: the code server and run workers that load it at once never read
    half a file. Elsewhere the manifest comes from set-up (scripts/setup.sh, the Dockerfile)."""

    def prepare_if_dev(self, project: DbtProject) -> None:
        if self.using_dagster_dev():
            self.prepare(project)

    def prepare(self, project: DbtProject) -> None:
        manifest = project.manifest_path
        files = [f for name in _PROJECT_FILES for f in (project.project_dir / name,
                                                          *(project.project_dir / name).rglob("*")) if f.is_file()]
        if manifest.exists() and all(f.stat().st_mtime <= manifest.stat().st_mtime for f in files):
            return
        target = project.project_dir / project.target_path
        target.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix=".parse-", dir=target) as tmp:
            proc = subprocess.run(
                [DBT_EXECUTABLE, "parse", "--quiet", "--project-dir", str(project.project_dir),
                 "--profiles-dir", str(project.profiles_dir), "--target-path", tmp],
                env={**os.environ, "DBT_LOG_PATH": tmp, "DBT_SEND_ANONYMOUS_USAGE_STATS": "false"},
                cwd=project.project_dir, capture_output=True, text=True)
            if proc.returncode != 0 or not Path(tmp, "manifest.json").exists():
                raise RuntimeError(f"dbt parse of {project.project_dir} failed:\n{proc.stdout}\n{proc.stderr}")
            os.replace(Path(tmp, "manifest.json"), manifest)


quality_project = DbtProject(project_dir=DBT_PROJECT_DIR, profiles_dir=DBT_PROJECT_DIR)
DevPreparer().prepare_if_dev(quality_project)  # `dagster dev` only (DbtProject takes no preparer of its own)
if not quality_project.manifest_path.exists():
    raise FileNotFoundError(f"{quality_project.manifest_path} is missing: run `make setup` (it runs `dbt parse` "
                            "of dbt_quality), or `dbt parse --project-dir dbt_quality --profiles-dir dbt_quality`")


class QualityTranslator(DagsterDbtTranslator):
    """dbt sources are the pipeline's own assets (same name as the table); models live under `quality/`, in
    group `quality`; each test's description is its check's description."""

    def get_asset_key(self, dbt_resource_props: Mapping[str, Any]) -> AssetKey:
        if dbt_resource_props["resource_type"] == "source":
            return AssetKey(dbt_resource_props["name"])
        return AssetKey([QUALITY_PREFIX, dbt_resource_props["name"]])

    def get_group_name(self, dbt_resource_props: Mapping[str, Any]) -> str | None:
        return QUALITY_GROUP

    def get_automation_condition(self, dbt_resource_props: Mapping[str, Any]):  # type: ignore[no-untyped-def]
        return over_every_partition()

    def get_asset_spec(self, manifest: Mapping[str, Any], unique_id: str, project: DbtProject | None) -> AssetSpec:
        spec = super().get_asset_spec(manifest, unique_id, project)
        own = {d.asset_key for d in spec.deps}
        if not unique_id.startswith("model.") or not own & SHARD_TABLE_KEYS:
            return spec
        # A model over one table of a shard's chain also depends on the chain's other tables: they are written one
        # after another in one run, and its tests join them (relationships). With the same inputs and condition,
        # every model over them is due at the same tick, once the chain's run is done: one dbt run after a chain,
        # not one per table as each is written (nor a second one when a tick falls between two tables).
        return spec.merge_attributes(deps=sorted(SHARD_TABLE_KEYS - own, key=lambda k: k.to_user_string()))

    def get_tags(self, dbt_resource_props: Mapping[str, Any]) -> Mapping[str, str]:
        # a model is a view: what reads it (a shard's export) reads its own shard's rows, through their checks
        return {**super().get_tags(dbt_resource_props), FIXED_DATA_VERSION_TAG: "true"}

    def get_asset_check_spec(self, asset_spec, manifest, unique_id, project):  # type: ignore[no-untyped-def]
        spec = super().get_asset_check_spec(asset_spec, manifest, unique_id, project)
        if spec is None:
            return spec
        # Every test gates what is downstream of its model (the export): blocking; and automation runs it with
        # its model (a check has a condition of its own, else a model is built without its tests).
        description = spec.description or (manifest["nodes"].get(unique_id) or {}).get("description") or None
        return spec._replace(blocking=True, description=description,
                             automation_condition=with_its_asset(spec.asset_key))


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
    store.sync(list(SOURCE_TABLES))  # an s3:// root: bring the working copy up to date first
    db = quality_db_path(store.root)
    variables = dbt_vars(pipeline.config())
    context.log.info(f"dbt build over {store.uri} with vars {variables}")
    dbt = DbtCliResource(project_dir=quality_project, dbt_executable=DBT_EXECUTABLE)
    with file_lock(db.with_name(".lock")):  # one dbt process per root: DuckDB lets one process write a file
        with _environ({"FINEINSTRUCTIONS_ROOT": str(store.root), "FINEINSTRUCTIONS_QUALITY_DB": str(db)}):
            invocation = dbt.cli(["build", "--vars", json.dumps(variables)], context=context, raise_on_error=False)
        for event in invocation.stream():  # every check's evaluation is recorded, failed or not
            # A fixed data version (the models are views): a build does not make every shard's export stale.
            yield (Output(event.value, event.output_name, metadata=event.metadata, data_version=VIEW_VERSION)
                   if isinstance(event, Output) else event)
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


def failed_blocking_checks(context: AssetExecutionContext) -> list[tuple[str, str]]:
    """The dbt tests whose latest evaluation did not pass. Blocking checks stop the export inside the run that
    evaluated them, and automation waits for them; this covers the export launched in a run of its own (by
    hand, or a backfill that ran the dbt build in an earlier run, which Dagster does not hold it to)."""
    out = []
    for key in QUALITY_CHECK_KEYS:
        record = context.instance.get_latest_asset_check_evaluation_record(key)
        # no event: the latest execution is only planned (in progress, or its run stopped before the test ran)
        evaluation = record.event.asset_check_evaluation if record is not None and record.event else None
        if evaluation is None or not evaluation.passed:
            status = "never evaluated" if record is None else "not finished" if evaluation is None else "failed"
            out.append((f"{key.asset_key.to_user_string()}: {key.name}", status))
    return out


def refuse_unless_checks_passed(context: AssetExecutionContext, shard: str) -> None:
    failed = failed_blocking_checks(context)
    if failed:
        raise Failure(description=describe_failed_checks(shard, failed),
                      metadata={"blocking_checks_not_passed": MetadataValue.json(dict(failed))})
