"""Set-up installs the locked versions: `pip freeze` of this environment is exactly what constraints.txt names, at
those versions (what `make lock` froze after the suite passed on them)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LOCK = REPO / "constraints.txt"
NOT_LOCKED = {"pip", "setuptools", "wheel", "distribute", "fineinstructions-dagster"}  # what `pip freeze` leaves out


def _name(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def locked() -> tuple[dict[str, str], str]:
    text = LOCK.read_text()
    pins = dict(line.split("==", 1) for line in text.splitlines() if line and not line.startswith("#"))
    extras = re.search(r"^# locked-extras: (.+)$", text, re.M)
    assert extras, "constraints.txt names the extras it was locked with"
    return {_name(k): v.strip() for k, v in pins.items()}, extras.group(1).strip()


def test_the_environment_holds_exactly_the_locked_versions():
    pins, extras = locked()
    stamp = REPO / ".venv" / ".fi-setup-stamp"
    if not stamp.exists() or not stamp.read_text().strip().endswith(f"-{extras}-"):
        pytest.skip(f"this environment was not set up locked with extras {extras} (FI_EXTRAS, FI_UNLOCKED)")
    # pip's own view of this environment (not this process's sys.path, which tests extend)
    command = [sys.executable, "-m", "pip", "freeze", "--exclude-editable", "--disable-pip-version-check"]
    freeze = subprocess.run(command, capture_output=True, text=True, check=True, timeout=120).stdout
    installed = {_name(k): v.strip() for k, v in (line.split("==", 1) for line in freeze.splitlines() if "==" in line)}
    installed = {k: v for k, v in installed.items() if k not in NOT_LOCKED}
    wrong = {k: (v, pins.get(k)) for k, v in installed.items() if pins.get(k) != v}
    assert not wrong, f"installed (version, locked version): {wrong}"
    assert not set(pins) - set(installed), f"locked but not installed: {sorted(set(pins) - set(installed))}"
