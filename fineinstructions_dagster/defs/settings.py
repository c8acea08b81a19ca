"""Each stage's settings as Dagster sees them: one observable source per stage (`<stage>_settings`) whose data
version is a hash of the settings in force for that stage (its thresholds and bounds, and the models it runs by
name and resolved revision), computed when observed, never at import. The stage's assets depend on it, so a
changed threshold, model or index setting makes exactly that stage's assets stale, in the UI and for automation
and the scheduled backfill; what follows is due once they were re-made.

`STAGES` is the one definition of each stage's settings: the observation hashes it, and the chunked stages' part
definitions (lib/chunks.definition_hash) are built from the same values, so a resumed run never reuses a part
made under other settings. The sensors, the scheduled backfill and `fineinstructions run` record an observation
only when a stage's version changed, before they request anything (a step run before its settings were ever
observed reads as stale once they are)."""

from __future__ import annotations

import hashlib
import inspect
import json
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, is_dataclass
from typing import Any

from dagster import (
    AssetKey,
    AssetObservation,
    AssetSpec,
    DagsterInstance,
    DataVersion,
    MetadataValue,
    ObserveResult,
    multi_observable_source_asset,
)
from dagster._core.definitions.data_version import DATA_VERSION_TAG

from fineinstructions_dagster.defs.inputs import benchmark_sources, benchmark_versions
from fineinstructions_dagster.defs.resources import (
    EmbedderResource,
    InputsResource,
    LLMResource,
    PipelineResource,
    RelevanceResource,
)
from fineinstructions_dagster.stages.decontamination import hash_scheme


@dataclass(frozen=True)
class StageSettings:
    """One stage's settings source: its asset key, the graph group it is drawn in, and `values`, the settings in
    force, from the resources it is given by name (the same names the stage's assets take)."""

    key: str
    group: str
    values: Callable[..., dict[str, Any]]

    def resource_keys(self) -> tuple[str, ...]:
        return tuple(inspect.signature(self.values).parameters)

    def of(self, resources: Mapping[str, Any]) -> dict[str, Any]:
        """The settings in force under `resources` (resource key -> resource)."""
        return self.values(**{k: resources[k] for k in self.resource_keys()})

    def version(self, resources: Mapping[str, Any]) -> str:
        """The data version of these settings: a hash of their values."""
        return settings_version(self.of(resources))


def _plain(value: Any) -> Any:
    """Settings as JSON: dataclasses as their fields, tuples as lists (for the hash and the UI's metadata)."""
    if is_dataclass(value) and not isinstance(value, type):
        return _plain(asdict(value))
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def settings_version(values: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(_plain(values), sort_keys=True, default=str).encode()).hexdigest()[:16]


def _decontamination(pipeline: PipelineResource, inputs: InputsResource) -> dict[str, Any]:
    cfg = pipeline.config().decontamination
    found, _ = benchmark_sources(inputs.benchmarks(), cfg.builtin)
    # the benchmark files' versions: a benchmark file added, replaced or removed changes what is decontaminated
    # and how the n-grams are hashed (a Polars upgrade changes the word hashes: the table is built again)
    return {"decontamination": cfg, "benchmarks": benchmark_versions(found), "hash_scheme": hash_scheme(cfg.ngram)}


def _queries(pipeline: PipelineResource) -> dict[str, Any]:
    return {"query_filter": pipeline.config().queries}


def _templates(pipeline: PipelineResource, genericizer_llm: LLMResource) -> dict[str, Any]:
    cfg, model = pipeline.config(), genericizer_llm.identity()
    return {"genericizer": model, "format": cfg.format_for("genericizer", model["model"]),
            "sampling": cfg.genericizer_sampling, "max_template_chars": cfg.max_template_chars,
            "max_description_chars": cfg.max_description_chars}


def _index(pipeline: PipelineResource, embedder: EmbedderResource) -> dict[str, Any]:
    return {"embedder": embedder.identity(), "index": pipeline.config().template_index}


def _filter(pipeline: PipelineResource) -> dict[str, Any]:
    cfg = pipeline.config()
    return {"document_filter": cfg.documents, "minhash": cfg.minhash}


def _dedup(pipeline: PipelineResource) -> dict[str, Any]:
    return {"minhash": pipeline.config().minhash}


def _matching(pipeline: PipelineResource, embedder: EmbedderResource) -> dict[str, Any]:
    cfg = pipeline.config()
    # the hubness penalty is estimated per chunk of documents: the chunk size shapes the matches
    return {"embedder": embedder.identity(), "match": cfg.match_config(), "chunk_rows": cfg.chunk_rows}


def _instantiation(pipeline: PipelineResource, instantiator_llm: LLMResource, embedder: EmbedderResource,
                   relevance: RelevanceResource) -> dict[str, Any]:
    cfg, model = pipeline.config(), instantiator_llm.identity()
    prompt_format = cfg.format_for("instantiator", model["model"])
    extract = prompt_format == "extract"  # extract: the embedder offers each slot its phrases
    return {"instantiator": model, "format": prompt_format, "sampling": cfg.instantiator_sampling,
            "extract_answer": cfg.extract_answer if extract else "",
            "ranker": embedder.identity() if extract else {}, "relevance": relevance.identity(),
            "max_document_chars": cfg.max_document_chars, "max_instruction_chars": cfg.max_instruction_chars,
            "max_answer_chars": cfg.max_answer_chars, "min_instruction_words": cfg.min_instruction_words,
            "min_answer_words": cfg.min_answer_words,
            # each instruction's relevance baseline is estimated over its chunk: the chunk size shapes it
            "chunk_rows": cfg.chunk_rows}


def _judging(pipeline: PipelineResource, judge_llm: LLMResource, relevance: RelevanceResource) -> dict[str, Any]:
    cfg, model = pipeline.config(), judge_llm.identity()
    return {"judge": model, "format": cfg.format_for("judge", model["model"]), "sampling": cfg.judge_sampling,
            "max_document_chars": cfg.max_document_chars, "max_feedback_chars": cfg.max_feedback_chars,
            # what chooses and scores the control pairs (a chunk's share depends on its size)
            "control_share": cfg.control_share, "min_controls_per_shard": cfg.min_controls_per_shard,
            "chunk_rows": cfg.chunk_rows, "min_answer_words": cfg.min_answer_words,
            "min_instruction_words": cfg.min_instruction_words, "relevance": relevance.identity()}


def _gates(pipeline: PipelineResource, instantiator_llm: LLMResource) -> dict[str, Any]:
    cfg = pipeline.config()
    budgets = cfg.budgets()
    return {"profile": cfg.profile, "gates": cfg.final_gates(), "max_control_kept_share": cfg.max_control_kept_share,
            "control_check_blocks": cfg.control_check_blocks, "budgets": budgets,
            # the token budget counts with the export tokenizer
            "budget_tokenizer": budget_tokenizer(cfg, instantiator_llm) if budgets.counts_tokens else ""}


def budget_tokenizer(cfg: Any, instantiator_llm: LLMResource) -> str:
    """The tokenizer the token budget counts with: the export's (`export_tokenizer`, else the instantiator's)."""
    return cfg.export_tokenizer or instantiator_llm.model_name()


def _export(pipeline: PipelineResource, instantiator_llm: LLMResource) -> dict[str, Any]:
    cfg = pipeline.config()
    # a packed sequence never crosses a chunk of `chunk_rows` pairs
    return {"tokenizer": budget_tokenizer(cfg, instantiator_llm), "seq_len": cfg.export_seq_len,
            "chunk_rows": cfg.chunk_rows,
            "max_control_kept_share": cfg.max_control_kept_share, "control_check_blocks": cfg.control_check_blocks}


DECONTAMINATION_SETTINGS = StageSettings("decontamination_settings", "decontamination", _decontamination)
QUERY_SETTINGS = StageSettings("query_filter_settings", "queries", _queries)
TEMPLATE_SETTINGS = StageSettings("genericizer_settings", "templates", _templates)
INDEX_SETTINGS = StageSettings("template_index_settings", "matching", _index)
FILTER_SETTINGS = StageSettings("document_filter_settings", "documents", _filter)
DEDUP_SETTINGS = StageSettings("dedup_settings", "documents", _dedup)
MATCHING_SETTINGS = StageSettings("matching_settings", "matching", _matching)
INSTANTIATION_SETTINGS = StageSettings("instantiation_settings", "instantiation", _instantiation)
JUDGING_SETTINGS = StageSettings("judging_settings", "judging", _judging)
GATE_SETTINGS = StageSettings("gate_settings", "pairs", _gates)
EXPORT_SETTINGS = StageSettings("export_settings", "export", _export)
STAGES = (DECONTAMINATION_SETTINGS, QUERY_SETTINGS, TEMPLATE_SETTINGS, INDEX_SETTINGS, FILTER_SETTINGS,
          DEDUP_SETTINGS, MATCHING_SETTINGS, INSTANTIATION_SETTINGS, JUDGING_SETTINGS, GATE_SETTINGS, EXPORT_SETTINGS)
RESOURCE_KEYS = sorted({k for stage in STAGES for k in stage.resource_keys()})


def _observation(stage: StageSettings, resources: Mapping[str, Any]) -> AssetObservation:
    values = stage.of(resources)
    return AssetObservation(asset_key=stage.key, tags={DATA_VERSION_TAG: settings_version(values)},
                            metadata={"settings": MetadataValue.json(_plain(values))})


def changed_settings_observations(instance: DagsterInstance, resources: Mapping[str, Any],
                                  stages: tuple[StageSettings, ...] = ()) -> list[AssetObservation]:
    """An observation for each stage (of `stages`; all by default) whose settings' version differs from the one
    last observed (or was never observed): what the sensors record on a tick, and the runner and the scheduled
    backfill before they plan."""
    out = []
    for stage in stages or STAGES:
        event = _observation(stage, resources)
        if last_settings_version(instance, stage) != event.tags[DATA_VERSION_TAG]:
            out.append(event)
    return out


def last_settings_version(instance: DagsterInstance, stage: StageSettings) -> str | None:
    records = instance.fetch_observations(AssetKey(stage.key), limit=1).records
    observation = records[0].asset_observation if records else None
    return (observation.tags or {}).get(DATA_VERSION_TAG) if observation is not None else None


def settings_resources(context: Any) -> dict[str, Any]:
    """The resources the settings read, from a sensor's or an observation's context."""
    return {k: getattr(context.resources, k) for k in RESOURCE_KEYS}


def observe_settings(instance: DagsterInstance, resources: Mapping[str, Any]) -> list[str]:
    """Record, outside any run, the stages whose settings changed; returns their source keys."""
    events = changed_settings_observations(instance, resources)
    for event in events:
        instance.report_runless_asset_event(event)
    return [event.asset_key.to_user_string() for event in events]


@multi_observable_source_asset(
    name="pipeline_settings", can_subset=True, required_resource_keys=set(RESOURCE_KEYS),
    specs=[AssetSpec(s.key, group_name=s.group, skippable=True,
                     description="The settings this stage runs under (thresholds, bounds, models and their "
                                 "revisions); data version: their hash.") for s in STAGES])
def pipeline_settings(context):  # noqa: ANN001, ANN201 - Dagster reads a return annotation as outputs
    """The UI's "Observe sources" on the settings: each selected stage's version, from the resources now."""
    resources = settings_resources(context)
    selected = {k.to_user_string() for k in context.selected_asset_keys}
    for stage in STAGES:
        if stage.key in selected:
            values = stage.of(resources)
            yield ObserveResult(asset_key=stage.key, data_version=DataVersion(settings_version(values)),
                                metadata={"settings": MetadataValue.json(_plain(values))})
