"""The command line is offline unless asked, and every model is recorded with a revision that pins it."""

from __future__ import annotations

import os
import subprocess
import sys

from fineinstructions_dagster.llm.engines import get_engine, load_revision, resolve_revision
from tests.servers import REPO

PROBE = ("import os, sys; from fineinstructions_dagster import cli; "
         "cli.cmd_summary = lambda a: print(os.environ.get('HF_HUB_OFFLINE'), os.environ.get('TRANSFORMERS_OFFLINE')) "
         "or 0; cli.main(sys.argv[1:])")


def probe(*args: str, **env: str) -> str:
    clean = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE",
                                                               "FINEINSTRUCTIONS_ALLOW_DOWNLOADS")}
    done = subprocess.run([sys.executable, "-c", PROBE, *args], env={**clean, **env}, cwd=REPO,
                          capture_output=True, text=True, check=True)
    return done.stdout.strip().splitlines()[-1]


def test_cli_is_offline_unless_asked(tmp_path):
    assert probe("--root", str(tmp_path), "summary") == "1 1"
    assert probe("--root", str(tmp_path), "--online", "summary") == "None None"
    assert probe("--root", str(tmp_path), "summary", FINEINSTRUCTIONS_ALLOW_DOWNLOADS="1") == "None None"


def fake_hub_snapshot(home, repo: str, commit: str) -> None:
    """What the Hub cache holds after a download: refs/main -> snapshots/<commit>/..."""
    folder = home / "hub" / f"models--{repo.replace('/', '--')}"
    (folder / "refs").mkdir(parents=True)
    (folder / "refs" / "main").write_text(commit)
    (folder / "snapshots" / commit).mkdir(parents=True)
    (folder / "snapshots" / commit / "config.json").write_text("{}")


def test_every_model_gets_a_pinning_revision(tmp_path, monkeypatch, smoke_model):
    commit = "0123456789abcdef0123456789abcdef01234567"
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    fake_hub_snapshot(tmp_path / "hf", "org/judge", commit)
    import huggingface_hub.constants as hc

    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    assert resolve_revision("org/judge", None) == commit  # a cached Hub model: its snapshot
    assert load_revision("org/judge", None) == commit  # and that snapshot is what gets loaded
    assert resolve_revision("org/not-downloaded", None) == "unknown"  # named, never "unpinned"
    assert resolve_revision(str(smoke_model), None).startswith("smoke-")
    local = tmp_path / "my-model"
    local.mkdir()
    (local / "config.json").write_text('{"a": 1}')
    first = resolve_revision(str(local), None)
    (local / "config.json").write_text('{"a": 2}')
    assert len(first) == 12 and resolve_revision(str(local), None) != first  # a folder's content hash
    assert get_engine("openai", "org/judge", base_url="http://127.0.0.1:9/v1").info.revision == "server"
