"""Stage 2, instruction templates: the genericizer turns each query into a template with
<fi>slot</fi> tags plus a compatible document description; the bank merges identical templates."""

from __future__ import annotations

import re
from typing import Any

import polars as pl

from fineinstructions_dagster.lib.ids import content_id
from fineinstructions_dagster.lib.stats import StageStats
from fineinstructions_dagster.llm.engines import GenerationRequest, GenerationResult, SamplingConfig
from fineinstructions_dagster.prompts import genericize
from fineinstructions_dagster.stages.decontamination import BenchmarkIndex, remove_overlaps
from fineinstructions_dagster.stages.llm_calls import (
    GENERATION_SCHEMA,
    QUARANTINE_EXTRA,
    LLMCall,
    frame,
    parse_json_object,
    run_generation_stage,
    seed_for,
)

BASE_SCHEMA: dict[str, pl.DataType] = {
    "query_id": pl.String(), "source": pl.String(), "query_text": pl.String(), "genericization_id": pl.String(),
} | GENERATION_SCHEMA
TEMPLATE_SCHEMA = BASE_SCHEMA | {"template_id": pl.String(), "template": pl.String(),
                                 "compatible_document_description": pl.String(), "n_slots": pl.Int32()}

_TAG = re.compile(r"</?fi>")
_SLOT = re.compile(r"<fi>(.*?)</fi>", re.DOTALL)
# Personal data a genericizer must have abstracted into a slot, never copied into a template.
_EMAIL = re.compile(r"[\w.+-]+@[\w-]+(\.[\w-]+)+")
_PHONE = re.compile(r"(?<![\w.])(\+?\d[\d ()./-]{6,}\d)(?![\w.])")
# Number runs that are not phone numbers: ISO dates, year ranges, dotted versions / IP-like groups.
_NOT_PHONE = re.compile(r"^(\d{4}-\d{2}-\d{2}|\d{4}\s*[-/]\s*\d{4}|\d+(\.\d+){2,})$")
MIN_TEMPLATE_CHARS = 8  # of the text without the tags: 'How to x?' passes, 'Why x' does not


def _has_phone(text: str) -> bool:
    """Seven or more digits in one run of digits and separators, unless the run is a date, a year range or a
    dotted number. Slot text is ignored: a slot describes what goes there and may carry an example."""
    text = _SLOT.sub(" ", text)
    return any(sum(c.isdigit() for c in m.group(1)) >= 7 and not _NOT_PHONE.match(m.group(1).strip())
               for m in _PHONE.finditer(text))


def validate_template(template: str, description: str, max_template_chars: int,
                      max_description_chars: int, query: str | None = None) -> str | None:
    """The reason a genericizer output is unusable, or None if it is a valid template. A template without
    slots is accepted only when it is the query itself (the query was already generic)."""
    if not template.strip():
        return "empty_template"
    if len(template) > max_template_chars:
        return "template_too_long"
    if len(_TAG.sub("", template).strip()) < MIN_TEMPLATE_CHARS:
        return "template_too_short"
    if _EMAIL.search(template) or _EMAIL.search(description):
        return "personal_data_email"
    if _has_phone(template) or _has_phone(description):
        return "personal_data_phone"
    depth = 0
    for tag in _TAG.findall(template):
        depth += 1 if tag == "<fi>" else -1
        if depth < 0:
            return "unbalanced_slot_tags"
        if depth > 1:
            return "nested_slot_tags"
    if depth != 0:
        return "unbalanced_slot_tags"
    slots = _SLOT.findall(template)
    already_generic = query is not None and normalise_template(query).lower() == template.lower()
    if not slots and not already_generic:
        return "no_slot"
    if any(not s.strip() for s in slots):
        return "empty_slot"
    if slots and not _SLOT.sub("", template).strip():
        return "only_slots"
    if not description.strip():
        return "empty_description"
    if len(description) > max_description_chars:
        return "description_too_long"
    return None


def normalise_template(template: str) -> str:
    return " ".join(template.split())


def genericize_queries(
    queries: pl.DataFrame, llm: LLMCall, sampling: SamplingConfig, max_template_chars: int,
    max_description_chars: int, run_id: str = "", prompt_format: str = "instruct",
    benchmarks: BenchmarkIndex | None = None,
) -> tuple[pl.DataFrame, pl.DataFrame, StageStats]:
    """Return (valid templates, quarantined outputs with reason and raw output, stats). `prompt_format`:
    `instruct` (our prompt + JSON schema, for general instruct models) or `query_templatizer` (the released
    model's convention: the bare query in, JSON out; no schema, its output is parsed and validated). A template
    or description that shares an n-gram with a `benchmarks` item is quarantined (`benchmark_overlap`)."""
    if prompt_format not in genericize.FORMATS:
        raise ValueError(f"genericizer prompt_format must be one of {genericize.FORMATS}, got {prompt_format!r}")
    released = prompt_format == "query_templatizer"
    stats = StageStats(total=queries.height)
    version = genericize.RELEASED_PROMPT_VERSION if released else genericize.PROMPT_VERSION
    rows = queries.select("query_id", "source", "text").to_dicts()
    requests = [GenerationRequest(genericize.released_messages(r["text"]), sampling, seed_for(r["query_id"]))
                if released else
                GenerationRequest(genericize.messages(r["text"]), sampling, seed_for(r["query_id"]),
                                  genericize.schema(r["text"], max_template_chars, max_description_chars))
                for r in rows]
    required = ("template", "compatible_document_description") if released else \
        ("specific", "kind", "compatible_document_description")

    def identify(r: dict[str, Any], prov: dict[str, str]) -> dict[str, Any]:
        return {"query_id": r["query_id"], "source": r["source"], "query_text": r["text"],
                "genericization_id": content_id("genericization", r["query_id"], prov), "run_id": run_id}

    def interpret(r: dict[str, Any], res: GenerationResult) -> tuple[dict[str, Any], str]:
        obj, reason = parse_json_object(res, required)
        if obj is None:
            return {}, reason
        description = " ".join(str(obj["compatible_document_description"]).split())
        if released:
            template = normalise_template(str(obj["template"]))
        else:  # our convention: the template is the query with the chosen phrase as its slot
            kind = " ".join(str(obj["kind"]).split())
            if kind.lower() in genericize.EXAMPLE_TEXTS or description.lower() in genericize.EXAMPLE_TEXTS:
                return {}, "copied_example"
            built = genericize.template_from(r["text"], str(obj["specific"]), kind)
            if built is None:
                return {}, "phrase_not_in_query"
            template = normalise_template(built)
        reason = validate_template(template, description, max_template_chars, max_description_chars,
                                   query=r["text"]) or ""
        return {"template_id": content_id("template", template), "template": template,
                "compatible_document_description": description, "n_slots": len(_SLOT.findall(template))}, reason

    kept, quarantined = run_generation_stage(rows, requests, llm, version, sampling, identify, interpret, stats)
    templates, overlapping = remove_overlaps(frame(kept, TEMPLATE_SCHEMA), benchmarks,
                                             ["template", "compatible_document_description"], "genericization_id",
                                             stats)
    return templates, pl.concat([frame(quarantined, BASE_SCHEMA | QUARANTINE_EXTRA), overlapping],
                                how="diagonal_relaxed"), stats


def canonical_template_expr(col: str = "template") -> pl.Expr:
    """What makes two templates near-duplicates: the same text, slots included, up to case, spacing,
    space before punctuation and trailing punctuation ("How do I sort <fi>a list</fi>?" = "how do I  sort
    <fi>A list</fi>"); "learn C++?" and "learn C?" stay apart, as do slots that ask for different things."""
    return (pl.col(col).str.to_lowercase()
            .str.replace_all(r"\s+", " ")
            .str.replace_all(r" ([?!.,;:])", "$1")
            .str.replace_all(r"[\s?!.,;:]+$", "")
            .str.strip_chars())


def build_template_bank(templates: pl.DataFrame, run_id: str = "") -> tuple[pl.DataFrame, StageStats]:
    """Merge identical and near-duplicate templates (`canonical_template_expr`) across sources. Each bank row
    keeps every source query's id and the ids of the templates merged into it; template, description and
    template_id come from the lowest query_id, so the bank is the same whatever the order."""
    stats = StageStats(total=templates.height)
    if templates.height == 0:
        raise ValueError("template bank is empty: no query source produced a valid template")
    bank = (
        templates.sort("query_id")
        .with_columns(canonical_template_expr().alias("_canonical"))
        .group_by("_canonical", maintain_order=True)
        .agg(
            pl.col("template_id").first(),
            pl.col("template").first(),
            pl.col("compatible_document_description").first(),
            pl.col("n_slots").first(),
            pl.col("query_id").alias("query_ids"),
            pl.col("template_id").unique().sort().alias("merged_template_ids"),
            pl.col("source").unique().sort().alias("sources"),
            pl.col("genericization_id").first(),
        )
        .drop("_canonical")
        .with_columns(pl.col("query_ids").list.len().alias("n_queries"), pl.lit(run_id).alias("run_id"))
        .sort("template_id")
    )
    stats.kept = bank.height
    exact = templates["template_id"].n_unique()
    stats.drop("duplicate_template", templates.height - exact)
    stats.drop("near_duplicate_template", exact - bank.height)
    return bank, stats
