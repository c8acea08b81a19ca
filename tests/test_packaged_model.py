"""`make run` with its defaults on a new folder of queries and corpus files: the packaged real model
(SmolLM2-135M-Instruct, converted by set-up) runs the three LLM stages on vLLM, the chat template is the model's
own, every structured output parses, and the pairs land in a root of their own whose lineage names the model."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import polars as pl
import pytest

from fineinstructions_dagster.config import profile_config

pytestmark = [pytest.mark.slow]  # runs `make run` and the graph in processes of their own

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def packaged_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The checkpoint set-up built (`make test` runs set-up first), else one built here (~30 s)."""
    from fineinstructions_dagster.llm.packaged import build_packaged_model, packaged_model_info

    built = Path(os.environ.get("FINEINSTRUCTIONS_PACKAGED_MODEL", REPO / "models" / "smollm2-135m-instruct"))
    if packaged_model_info(built) is None:
        built = build_packaged_model(tmp_path_factory.mktemp("packaged"))
    return built


def test_the_packaged_model_converts_with_its_chat_template(packaged_model):
    from transformers import AutoTokenizer

    from fineinstructions_dagster.llm.packaged import packaged_model_info

    info = packaged_model_info(packaged_model)
    assert info and info["name"] == "SmolLM2-135M-Instruct" and info["revision"].startswith("gguf-q4_1-")
    config = json.loads((packaged_model / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["num_hidden_layers"] == 30
    tok = AutoTokenizer.from_pretrained(packaged_model)
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert "<|im_start|>user\nhi<|im_end|>" in text and text.endswith("<|im_start|>assistant\n")


def test_make_run_with_its_defaults_on_new_inputs_makes_pairs_in_a_root_of_its_own(tmp_path, packaged_model):
    pytest.importorskip("vllm")
    from fineinstructions_dagster.lib.storage import TableStore
    from fineinstructions_dagster.sample import build_sample

    inputs = tmp_path / "my_data"  # not the demo's sample folder: other docs, fewer of them
    build_sample(inputs, shards=("howto",), max_docs_per_shard=6, max_queries=8)
    env = {k: v for k, v in os.environ.items() if not k.startswith("FINEINSTRUCTIONS_")}
    env.update(FINEINSTRUCTIONS_QUERIES=str(inputs / "queries"), FINEINSTRUCTIONS_CORPUS=str(inputs / "corpus"),
               FINEINSTRUCTIONS_PACKAGED_MODEL=str(packaged_model), DAGSTER_HOME=str(tmp_path / "home"),
               FINEINSTRUCTIONS_CPU_KV_CACHE_GB="0.5")
    (tmp_path / "home").mkdir()
    proc = subprocess.run(["make", "-s", "-C", str(REPO), "run"], env=env, capture_output=True, text=True,
                          timeout=900)
    root_line = [ln for ln in proc.stderr.splitlines() if ln.startswith("storage root: ")]
    assert root_line, proc.stderr[-3000:]
    root = Path(root_line[0].split()[2])
    try:
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        assert root.parent == REPO / "runs" and root.name.startswith("corpus-")
        store = TableStore(str(root))
        pairs = pl.concat([store.read("fineinstructions", p) for p in store.partitions("fineinstructions")])
        assert pairs.height > 0
        assert "DEMO PROFILE: every LLM role ran the packaged SmolLM2-135M-Instruct" in proc.stdout
        assert "quality per LLM stage:" in proc.stdout and "== lineage of one generated pair ==" in proc.stdout
        for table in ("templates", "instantiations", "judgements"):
            rows = pl.concat([store.read(table, p) for p in store.partitions(table)])
            assert set(rows["model"]) == {str(packaged_model)}, table  # no smoke model anywhere
            assert all(r.startswith("SmolLM2-135M-Instruct@gguf-q4_1-") for r in rows["model_revision"])
            assert all(p.startswith("<|im_start|>system") for p in rows["prompt"])  # the model's own template
            for raw in rows["raw_output"]:
                json.loads(raw)  # structured output that parses
        assert set(pairs["instantiator_model"]) == set(pairs["judge_model"]) == {str(packaged_model)}
        assert (pairs["grounding"] >= 0.6).all() and (pairs["judge_score"] >= pairs["selected_judge_threshold"]).all()
        # the demo's relevance gate is the margin over each instruction's baseline: every pair has one, above it
        assert (pairs["relevance_margin"] >= pairs["selected_min_relevance_margin"]).all()
        assert set(pairs["selected_min_relevance_margin"]) == {profile_config("demo").min_relevance_margin}
    finally:
        shutil.rmtree(root, ignore_errors=True)
