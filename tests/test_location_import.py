"""Loading the code location does no work: no subprocess (no `dbt parse`), no environment variable read by our
code, whatever the environment holds; settings are read when a run uses them (defs/resources.py)."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.servers import REPO

PROBE = r'''
import json, os, sys

import dagster, dagster_aws, dagster_dbt  # their own import-time work (dagster's croniter runs `file`) is theirs

popen = []
sys.addaudithook(lambda event, args: popen.append(str(args[1])[:200]) if event == "subprocess.Popen" else None)
ours = []

class Recording(dict):
    """os.environ that notes which variables code of this package reads."""
    def _note(self, key):
        frame = sys._getframe(2)
        while frame is not None and frame.f_code.co_filename.endswith("os.py"):
            frame = frame.f_back
        if frame is not None and "fineinstructions_dagster" in frame.f_code.co_filename:
            ours.append(f"{key} ({frame.f_code.co_filename.rsplit('/', 1)[-1]}:{frame.f_lineno})")
    def __getitem__(self, key):
        self._note(key)
        return dict.__getitem__(self, key)
    def get(self, key, default=None):
        self._note(key)
        return dict.get(self, key, default)
    def __contains__(self, key):
        self._note(key)
        return dict.__contains__(self, key)

os.environ = Recording(os.environ)
from fineinstructions_dagster.definitions import defs
defs.get_repository_def().load_all_definitions()
print(json.dumps({"popen": popen, "ours": ours, "assets": len(list(defs.resolve_asset_graph().get_all_asset_keys()))}))
'''


def test_the_location_loads_with_an_empty_environment_running_and_reading_nothing():
    proc = subprocess.run([sys.executable, "-c", PROBE], env={}, cwd=REPO, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["popen"] == [], "subprocesses started while loading the location"
    assert out["ours"] == [], "environment variables read while loading the location"
    assert out["assets"] >= 20
