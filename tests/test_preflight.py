"""`fineinstructions run` checks its set-up before any work: a missing folder, an empty one, a bad profile or a model
that does not resolve offline stop it within seconds, one line per problem naming what and which variable."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from tests.conftest import smoke_env

CLI = str(Path(sys.executable).with_name("fineinstructions"))


def _run(env: dict[str, str], tmp_path: Path) -> tuple[subprocess.CompletedProcess[str], float]:
    started = time.monotonic()
    proc = subprocess.run([CLI, "run"], env={**os.environ, **env, "DAGSTER_HOME": ""}, cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    return proc, time.monotonic() - started


def test_a_run_with_bad_settings_stops_in_seconds_naming_each_problem(tmp_path, smoke_model, sample_inputs):
    (tmp_path / "empty").mkdir()
    env = {**smoke_env(tmp_path / "root", smoke_model, sample_inputs),
           "FINEINSTRUCTIONS_QUERIES": str(tmp_path / "no-such-folder"),
           "FINEINSTRUCTIONS_CORPUS": str(tmp_path / "empty"),
           "FINEINSTRUCTIONS_BENCHMARKS": str(tmp_path / "no-benchmarks"),
           "FINEINSTRUCTIONS_JUDGE_MODEL": str(tmp_path / "no-such-model"),
           "FINEINSTRUCTIONS_INSTANTIATOR_MODEL": "someone/not-downloaded-model"}
    proc, seconds = _run(env, tmp_path)
    assert proc.returncode == 2 and seconds < 30, (seconds, proc.stderr[-2000:])
    err = proc.stderr
    assert "Traceback" not in err
    assert f"FINEINSTRUCTIONS_QUERIES: the query folder {tmp_path / 'no-such-folder'} does not exist" in err
    assert f"FINEINSTRUCTIONS_CORPUS: no corpus shard files in {tmp_path / 'empty'}" in err
    assert f"FINEINSTRUCTIONS_BENCHMARKS: the benchmark folder {tmp_path / 'no-benchmarks'} does not exist" in err
    assert (f"judge model '{tmp_path / 'no-such-model'}' (set by FINEINSTRUCTIONS_JUDGE_MODEL): no such folder"
            in err)
    assert ("instantiator model 'someone/not-downloaded-model' (set by FINEINSTRUCTIONS_INSTANTIATOR_MODEL): not in "
            "the local Hugging Face cache and downloads are off") in err
    assert "genericizer" not in err  # the smoke model resolves
    assert not (tmp_path / "root").exists()  # nothing was written

    bad_profile, _ = _run({**smoke_env(tmp_path / "root", smoke_model, sample_inputs),
                           "FINEINSTRUCTIONS_PROFILE": "fast"}, tmp_path)
    assert bad_profile.returncode == 2 and "FINEINSTRUCTIONS_PROFILE='fast'" in bad_profile.stderr
    assert "profiles: paper, demo, smoke" in bad_profile.stderr


def test_good_settings_have_no_problem(monkeypatch, smoke_model, sample_inputs, tmp_path):
    from fineinstructions_dagster.preflight import problems

    for k, v in smoke_env(tmp_path / "root", smoke_model, sample_inputs).items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert problems() == []
    (tmp_path / "benchmarks").mkdir()
    (tmp_path / "benchmarks" / "gsm8k.jsonl").write_text('{"question": "q"}\n')
    monkeypatch.setenv("FINEINSTRUCTIONS_BENCHMARKS", str(tmp_path / "benchmarks"))
    assert problems() == []


def test_a_run_on_new_inputs_gets_a_root_of_its_own(tmp_path):
    from fineinstructions_dagster.cli import own_root

    root = own_root("/in/queries", "/in/corpus")
    assert root == own_root("/in/queries", "/in/corpus") and Path(root).name.startswith("corpus-")
    assert Path(root).parent.name == "runs" and root != own_root("/in/queries", "/other/corpus")
    env = {"FINEINSTRUCTIONS_QUERIES": str(tmp_path / "q"), "FINEINSTRUCTIONS_CORPUS": str(tmp_path / "c"),
           "FINEINSTRUCTIONS_ROOT": ""}
    proc, _ = _run(env, tmp_path)  # stops at the preflight (no folders), after saying where it would write
    assert proc.returncode == 2 and "FINEINSTRUCTIONS_ROOT is not set: a root of its own" in proc.stderr
    assert f"storage root: {tmp_path / 'runs' / 'c-'}" in proc.stderr


def test_an_engine_that_does_not_fit_in_memory_is_named_before_it_starts(monkeypatch, tmp_path):
    from fineinstructions_dagster import preflight

    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text('{"num_hidden_layers": 2, "num_attention_heads": 4, "hidden_size": 256}')
    (model / "model.safetensors").write_bytes(b"\0" * 1024)
    monkeypatch.setattr(preflight, "_vllm_on_cpu", lambda: True)
    monkeypatch.setenv("FINEINSTRUCTIONS_CPU_KV_CACHE_GB", "4096")
    need = preflight.engine_memory_bytes(str(model))
    assert need is not None and need > 4096 * preflight.GiB
    line = preflight.memory_problem(need, str(model))
    assert line and f"the vLLM engine for '{model}' needs about 4097.0 GiB" in line
    assert "FINEINSTRUCTIONS_CPU_KV_CACHE_GB" in line
    monkeypatch.setenv("FINEINSTRUCTIONS_CPU_KV_CACHE_GB", "0.25")
    assert preflight.memory_problem(preflight.engine_memory_bytes(str(model)), str(model)) is None
    monkeypatch.setattr(preflight, "_vllm_on_cpu", lambda: False)  # a GPU host or another backend: not told
    assert preflight.engine_memory_bytes(str(model)) is None
