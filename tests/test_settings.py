"""Each stage's settings source: one per stage, read by exactly that stage's assets, and its version moved by
exactly the settings that stage runs under; computed from the resources without loading a model."""

from __future__ import annotations

import pytest
from dagster import AssetKey

from fineinstructions_dagster.definitions import defs
from fineinstructions_dagster.defs.resources import PipelineResource, build_resources
from fineinstructions_dagster.defs.settings import STAGES

# what reads no setting of its own: merges, the dedup decisions applied, the report, dbt's views
NO_SETTINGS = {"template_bank", "documents", "dataset_report"}


def versions(**resources: object) -> dict[str, str]:
    return {s.key: s.version({**build_resources(), **resources}) for s in STAGES}


def test_each_stage_asset_reads_one_settings_source_and_each_source_is_read():
    graph = defs.resolve_asset_graph()
    keys = {AssetKey(s.key) for s in STAGES}
    for key in keys:
        assert not graph.get(key).is_materializable and graph.get(key).child_keys, key
    for key in graph.materializable_asset_keys:
        if key.path[0] == "quality":
            continue
        sources = set(graph.get(key).parent_keys) & keys
        assert len(sources) == (0 if key.to_user_string() in NO_SETTINGS else 1), (key, sources)


@pytest.mark.parametrize(("change", "moved"), [
    ({"judge_threshold": 2}, {"gate_settings"}),
    ({"min_relevance": 0.5}, {"gate_settings"}),
    ({"templates_per_document": 9}, {"matching_settings"}),
    ({"control_share": 0.5}, {"judging_settings"}),
    ({"chunk_rows": 64}, {"matching_settings", "instantiation_settings", "judging_settings", "export_settings"}),
    # the demo's bounds, formats and gates (its models follow FINEINSTRUCTIONS_PROFILE, not this resource)
    ({"profile": "demo"}, {"genericizer_settings", "matching_settings", "instantiation_settings", "judging_settings",
                           "gate_settings"}),
])
def test_a_setting_moves_exactly_the_stages_that_read_it(monkeypatch, change, moved):
    monkeypatch.setenv("FINEINSTRUCTIONS_PROFILE", "smoke")
    before = versions()
    after = versions(pipeline=PipelineResource(**change))
    assert {k for k in before if before[k] != after[k]} == moved


def test_a_model_moves_its_roles_stages_and_nothing_loads_it(monkeypatch, tmp_path):
    import fineinstructions_dagster.defs.resources as resources

    monkeypatch.setenv("FINEINSTRUCTIONS_PROFILE", "smoke")
    monkeypatch.setattr(resources, "get_engine", lambda *a, **k: pytest.fail("a settings version loaded a model"))
    before = versions()
    (tmp_path / "judge").mkdir()
    (tmp_path / "judge" / "config.json").write_text("{}")
    monkeypatch.setenv("FINEINSTRUCTIONS_JUDGE_MODEL", str(tmp_path / "judge"))
    after = versions()
    assert {k for k in before if before[k] != after[k]} == {"judging_settings"}
    (tmp_path / "judge" / "config.json").write_text('{"revised": true}')  # the same name, other weights
    assert versions()["judging_settings"] != after["judging_settings"]


def test_the_uis_observe_sources_records_the_version_the_sensors_compare(monkeypatch):
    from dagster import DagsterInstance
    from dagster._core.definitions.observe import observe

    from fineinstructions_dagster.defs.settings import changed_settings_observations, pipeline_settings

    monkeypatch.setenv("FINEINSTRUCTIONS_PROFILE", "smoke")
    with DagsterInstance.ephemeral() as instance:
        assert observe([pipeline_settings], instance=instance, resources=build_resources()).success
        assert changed_settings_observations(instance, build_resources()) == []  # the same versions
        assert [e.asset_key.to_user_string() for e in changed_settings_observations(
            instance, {**build_resources(), "pipeline": PipelineResource(judge_threshold=3)})] == ["gate_settings"]


def test_the_deterministic_setting_runs_vllm_one_sequence_at_a_time_and_moves_the_llm_stages(monkeypatch):
    from fineinstructions_dagster.defs.resources import LLMResource
    from fineinstructions_dagster.llm.engines import runs_deterministically

    monkeypatch.setenv("FINEINSTRUCTIONS_PROFILE", "smoke")
    before = versions()
    batched = LLMResource(role="judge", backend="vllm").engine()  # lazy: no model is loaded
    # in-process engine core, grammars compiled in step: batches follow from the requests
    assert "max_num_seqs" not in batched.info.options and runs_deterministically(batched.info)
    own_process = LLMResource(role="judge", backend="vllm", vllm_multiprocessing=True).engine()
    assert not runs_deterministically(own_process.info)  # its engine core takes requests as they arrive
    assert runs_deterministically(LLMResource(role="judge", backend="transformers").engine().info)
    monkeypatch.setenv("FINEINSTRUCTIONS_DETERMINISTIC", "1")
    alone = LLMResource(role="judge", backend="vllm").engine()
    assert alone.info.options["max_num_seqs"] == 1 and runs_deterministically(alone.info)
    after = versions()
    assert {k for k in before if before[k] != after[k]} == {"genericizer_settings", "instantiation_settings",
                                                             "judging_settings"}
