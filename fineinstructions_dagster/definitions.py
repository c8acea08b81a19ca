"""The code location: every definition under `defs/`, loaded as a folder (Dagster's project layout,
`[tool.dg]` in pyproject.toml). Each domain folder owns its assets, checks, jobs and sensors; `defs/resources.py`
binds the resources, `defs/automation.py` holds the automation conditions and their sensor."""

from pathlib import Path

from dagster import AssetsDefinition, load_from_defs_folder

defs = load_from_defs_folder(project_root=Path(__file__).resolve().parent.parent)

# Every asset of the location, once, for in-process materializations (`fineinstructions run`, tests, benchmarks);
# the folder's loader lists an asset once per module that names it.
ASSETS: list[AssetsDefinition] = list({id(a): a for a in defs.assets or [] if isinstance(a, AssetsDefinition)}.values())
