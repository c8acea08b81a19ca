"""Stage 5, instantiation: fill a matched template's slots from the document and answer it from the
document; expand the answer's excerpt markers from the document (a quote that is not there is caught);
measure how much of the answer is copied from the document (grounding)."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import numpy as np
import polars as pl

from fineinstructions_dagster.lib.ids import content_id
from fineinstructions_dagster.lib.stats import StageStats
from fineinstructions_dagster.llm.engines import GenerationRequest, GenerationResult, SamplingConfig
from fineinstructions_dagster.prompts import instantiate
from fineinstructions_dagster.prompts.common import truncate
from fineinstructions_dagster.prompts.genericize import FUNCTION_WORDS, slot_candidates
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
    "instantiation_id": pl.String(), "match_id": pl.String(), "doc_id": pl.String(), "template_id": pl.String(),
    "shard": pl.String(),
} | GENERATION_SCHEMA
INSTANTIATION_SCHEMA = BASE_SCHEMA | {"instruction": pl.String(), "answer": pl.String(),
                                      "grounding": pl.Float64(), "relevance": pl.Float64(),
                                      "relevance_baseline": pl.Float64(), "relevance_model": pl.String(),
                                      "fill_in_document": pl.Float64(), "fill_in_answer": pl.Float64()}

_WORD = re.compile(r"\w+", re.UNICODE)


def grounding(answer: str, document: str, span: int = 3) -> float:
    """Share of the answer's word tokens that lie inside a run of >= `span` consecutive words also
    found, in order, in the document. 1.0 = entirely copied, 0.0 = nothing copied."""
    a = [w.lower() for w in _WORD.findall(answer)]
    if len(a) < span:  # too short to hold a quoted span: a one- or two-word match shows no grounding
        return 0.0
    d = [w.lower() for w in _WORD.findall(document)]
    grams = {tuple(d[i:i + span]) for i in range(len(d) - span + 1)}
    covered = [False] * len(a)
    for i in range(len(a) - span + 1):
        if tuple(a[i:i + span]) in grams:
            covered[i:i + span] = [True] * span
    return sum(covered) / len(a)


def fill_coverage(instruction: str, template: str, text: str) -> float:
    """Share of the words the instruction put into the template's slots (its words that are neither in the
    template's fixed text nor function words) that `text` contains, a plural's singular counting; 1.0 when the
    fills add no such word. Against the document: an instruction about something the document does not mention
    cannot be answered from it; against the answer: an answer that names none of what the instruction asks about
    rarely answers it."""
    fixed = {w.lower() for w in _WORD.findall(_SLOT.sub(" ", template))}
    fills = [w for w in (w.lower() for w in _WORD.findall(instruction)) if w not in fixed and w not in FUNCTION_WORDS]
    if not fills:
        return 1.0
    stems = {w.lower().removesuffix("s") for w in _WORD.findall(text)}
    return sum(w.removesuffix("s") in stems for w in fills) / len(fills)


def fill_signals(instruction: str, template: str, document: str, answer: str) -> dict[str, float]:
    """The two fill columns of an instantiation (or control pair: `document` is its answer's)."""
    return {"fill_in_document": fill_coverage(instruction, template, document),
            "fill_in_answer": fill_coverage(instruction, template, answer)}


RELEASED_INSTRUCTION_KEYS = ("instruction", "query", "question", "prompt")
RELEASED_ANSWER_KEYS = ("answer", "response", "output")


def _first_key(obj: dict[str, Any], keys: tuple[str, ...]) -> Any:
    return next((obj[k] for k in keys if obj.get(k) is not None), None)


_EXCERPT = re.compile(r"<excerpt>(.*?)</excerpt>", re.DOTALL)
ELISION = "<...>"


def _words_pattern(text: str) -> re.Pattern[str] | None:
    """The text's words in order with any whitespace between them (quotes may re-wrap lines), not starting
    or ending inside a longer word."""
    words = text.split()
    if not words:
        return None
    body = r"\s+".join(map(re.escape, words))
    start = r"(?<!\w)" if words[0][0].isalnum() or words[0][0] == "_" else ""
    end = r"(?!\w)" if words[-1][-1].isalnum() or words[-1][-1] == "_" else ""
    return re.compile(start + body + end)


def expand_excerpts(answer: str, document: str, max_excerpt_chars: int = 4000) -> tuple[str, str]:
    """Replace every excerpt marker in `answer` with the document's own text: `<excerpt>TEXT</excerpt>` must
    occur in the document (up to whitespace); `<excerpt>START<...>END</excerpt>` becomes the document's span
    from START through the first END after it (of several STARTs before the same END, the nearest). Returns
    (expanded answer, "") or (answer, reason) when a marker is malformed, quotes something the document does
    not contain, or fits two different passages."""
    if "<excerpt>" not in answer and "</excerpt>" not in answer:
        return answer, ""
    out, pos = [], 0
    for m in _EXCERPT.finditer(answer):
        between = answer[pos:m.start()]
        body = m.group(1)
        if "<excerpt>" in between or "</excerpt>" in between or "<excerpt>" in body:
            return answer, "malformed_excerpt"
        head, sep, tail = body.partition(ELISION)
        start = _words_pattern(head)
        end_pat = _words_pattern(tail) if sep else None
        if start is None or (sep and end_pat is None):
            return answer, "malformed_excerpt"
        by_end: dict[int, int] = {}  # end offset -> the latest start before it (the shortest span)
        for first in start.finditer(document):
            last = end_pat.search(document, first.end()) if end_pat else first
            if last is not None:
                by_end[last.end()] = max(by_end.get(last.end(), -1), first.start())
        if not by_end:
            return answer, "excerpt_not_in_document"
        if len({document[b:e] for e, b in by_end.items()}) > 1:  # two different passages fit: do not guess
            return answer, "ambiguous_excerpt"
        end, begin = min(by_end.items())
        if end - begin > max_excerpt_chars:
            return answer, "excerpt_too_long"
        out += [between, document[begin:end]]
        pos = m.end()
    rest = answer[pos:]
    if "<excerpt>" in rest or "</excerpt>" in rest:
        return answer, "malformed_excerpt"
    return "".join(out) + rest, ""


def repetition(text: str, n: int = 3) -> float:
    """Share of the text's word n-grams that repeat an earlier one: 0 for prose, near 1 for a decoding loop."""
    words = [w.lower() for w in _WORD.findall(text)]
    grams = [tuple(words[i:i + n]) for i in range(len(words) - n + 1)]
    return 1.0 - len(set(grams)) / len(grams) if grams else 0.0


MAX_REPETITION = 0.3  # prose repeats few 3-grams (measured on the sample's documents: well under 0.1)


def gate_instantiation(instruction: str, answer: str, template: str, min_instruction_words: int = 1,
                       min_answer_words: int = 1) -> str | None:
    """Validity gates on a parsed instantiation: the reason it is unusable, or None."""
    if not answer.strip():
        return "empty_answer"
    if not instruction.strip():
        return "empty_instruction"
    if "<fi>" in instruction or "</fi>" in instruction:
        return "unfilled_slot"
    if " ".join(instruction.split()).lower() == " ".join(template.split()).lower():
        return "copies_template"
    if len(_WORD.findall(instruction)) < min_instruction_words:
        return "instruction_too_short"
    if len(_WORD.findall(answer)) < min_answer_words:
        return "answer_too_short"
    if repetition(answer) > MAX_REPETITION or repetition(instruction) > MAX_REPETITION:
        return "repetitive_output"
    return None


_SLOT = re.compile(r"<fi>(.*?)</fi>", re.DOTALL)
MAX_FILL_CHOICES = 48
FILL_CHOICES_PER_SLOT = 8
# (slot description, candidate phrases) -> the candidates, best first (e.g. by embedding similarity)
FillRanker = Callable[[str, list[str]], list[str]]
# (instructions, answers) -> how well each answer answers its instruction (stages/relevance.RelevanceScorer.score)
RelevanceScore = Callable[[list[str], list[str]], np.ndarray]
# (instructions, their doc ids, answers, their doc ids) -> each instruction's mean relevance of other documents'
# answers (RelevanceScorer.baseline)
RelevanceBaseline = Callable[[list[str], list[str], list[str], list[str]], np.ndarray]
# extract: the answer sentences offered, best first for the instruction (a 135M model picks among the first)
ANSWER_CHOICES = 8
EXTRACT_ANSWERS = ("model", "ranked")
RANKED_ANSWER_SENTENCES = 2  # ranked answers: the two best sentences (one rarely answers anything; measured)


def template_as_question(template: str) -> str:
    """The template with each slot's description in place of the slot: what its answer must answer before the
    slots are filled ("How does <fi>a programming language</fi> manage memory?" -> "How does a programming
    language manage memory?")."""
    return _SLOT.sub(lambda m: " ".join(m.group(1).split()), template)


def score_relevance(frame: pl.DataFrame, score: RelevanceScore | None, model: str,
                    baseline: RelevanceBaseline | None = None) -> pl.DataFrame:
    """`frame` with `relevance` (of its answer to its instruction; null without a scorer, which the final gate
    rejects), `relevance_baseline` (its instruction's mean relevance of the frame's answers from other documents,
    the chunk's pairs: null when there are too few) and `relevance_model`."""
    nulls = pl.Series([None] * frame.height, dtype=pl.Float64)
    if score is None or frame.height == 0:
        values, base = nulls.alias("relevance"), nulls.alias("relevance_baseline")
    else:
        instructions, answers, docs = (frame[c].to_list() for c in ("instruction", "answer", "doc_id"))
        values = pl.Series("relevance", score(instructions, answers), dtype=pl.Float64)
        base = (pl.Series("relevance_baseline", baseline(instructions, docs, answers, docs), dtype=pl.Float64,
                          nan_to_null=True) if baseline is not None else nulls.alias("relevance_baseline"))
    return frame.with_columns(values, base,
                              pl.lit(model if score is not None else None, pl.String).alias("relevance_model"))


def topical_phrases(document: str, limit: int = MAX_FILL_CHOICES) -> list[str]:
    """The document's phrases a slot may take, most repeated first: what a document says often is what it is
    about. Offered all ~500 phrases of a document in order, SmolLM2-135M picked near its first ones ("Why are
    away immutable?"); measured in benchmarks/packaged_model.py."""
    phrases = slot_candidates(document, max_words=3, limit=instantiate.MAX_FILLS)
    words = [w.lower() for w in _WORD.findall(document)]
    text = " " + " ".join(words) + " "

    def count(p: str) -> int:
        return text.count(" " + " ".join(w.lower() for w in _WORD.findall(p)) + " ")
    ranked = sorted(enumerate(phrases), key=lambda ip: (-count(ip[1]), ip[0]))
    return [p for _, p in ranked[:limit]]


def fill_template(template: str, fills: list[str]) -> tuple[str, str]:
    """The template with its slots replaced by `fills` in order: (instruction, "") or (template, reason) when a
    fill only repeats its slot's description (the model did not look at the document)."""
    slots = _SLOT.findall(template)
    for slot, fill in zip(slots, fills, strict=True):
        if " ".join(fill.split()).lower().strip(" .") == " ".join(slot.split()).lower().strip(" ."):
            return template, "slot_not_filled"
    it = iter(fills)
    return _SLOT.sub(lambda _: " ".join(next(it).split()), template), ""


def instantiate_matches(
    pending: pl.DataFrame, llm: LLMCall, sampling: SamplingConfig, max_document_chars: int,
    max_instruction_chars: int, max_answer_chars: int, run_id: str = "", prompt_format: str = "instruct",
    min_instruction_words: int = 1, min_answer_words: int = 1, rank_fills: FillRanker | None = None,
    rank_answers: FillRanker | None = None, relevance: RelevanceScore | None = None, relevance_model: str = "",
    extract_answer: str = "model", relevance_baseline: RelevanceBaseline | None = None,
) -> tuple[pl.DataFrame, pl.DataFrame, StageStats]:
    """`pending`: one row per match with columns match_id, doc_id, template_id, shard, text, template.
    Returns (instantiations, quarantined rows with reason and raw output, stats). `prompt_format`: `instruct`
    (our prompt + JSON schema), `extract` (small models: fill the slots and pick the document's sentences that
    answer it, under a schema that offers only those sentences) or `template_instantiator` (the released model's
    JSON input; its `null`, for a template that does not fit the document, is counted as `incompatible_template`).
    `rank_fills` (extract): offer each slot only the document phrases it ranks best for the slot's description;
    `rank_answers` (extract): offer only the ANSWER_CHOICES sentences it ranks best as answers to the template (its
    slots read as their descriptions), best first. `extract_answer` (extract): `model` (the model picks the answer
    among those) or `ranked` (the model only fills the slots; the answer is the RANKED_ANSWER_SENTENCES sentences
    `rank_answers` puts first for the filled instruction, in document order). `relevance`: scores each kept pair's
    answer against its instruction (column `relevance`, named by `relevance_model`); `relevance_baseline` what the
    chunk's answers from other documents score for each instruction (column `relevance_baseline`)."""
    if prompt_format not in instantiate.FORMATS:
        raise ValueError(f"instantiator prompt_format must be one of {instantiate.FORMATS}, got {prompt_format!r}")
    released, extract = prompt_format == "template_instantiator", prompt_format == "extract"
    if extract_answer not in EXTRACT_ANSWERS:
        raise ValueError(f"extract_answer must be one of {EXTRACT_ANSWERS}, got {extract_answer!r}")
    ranked = extract and extract_answer == "ranked"
    if ranked and rank_answers is None:
        raise ValueError("extract_answer 'ranked' needs rank_answers (the relevance model's ranking)")
    stats = StageStats(total=pending.height)
    version = {"template_instantiator": instantiate.RELEASED_PROMPT_VERSION,
               "extract": instantiate.EXTRACT_FILLS_PROMPT_VERSION if ranked else instantiate.EXTRACT_PROMPT_VERSION
               }.get(prompt_format, instantiate.PROMPT_VERSION)
    # Sorted by document so that a document's k prompts sit together and share their prefix.
    rows = pending.sort("doc_id", "match_id").to_dicts()

    def request(r: dict[str, Any]) -> GenerationRequest:
        document, seed = truncate(r["text"], max_document_chars), seed_for(r["match_id"])
        if released:
            return GenerationRequest(instantiate.released_messages(document, r["template"]), sampling, seed)
        if extract:
            sentences, fills = document_choices(r["doc_id"], document)
            if rank_answers is not None and not ranked:
                sentences = rank_answers(template_as_question(r["template"]), sentences)[:ANSWER_CHOICES]
            if rank_fills is not None:  # the phrases nearest each slot's description, slots in order
                fills = list(dict.fromkeys(p for slot in _SLOT.findall(r["template"])
                                           for p in rank_fills(slot, fills)[:FILL_CHOICES_PER_SLOT])) or fills
            return GenerationRequest(instantiate.extract_messages(document, r["template"], fills_only=ranked),
                                     sampling, seed,
                                     instantiate.extract_schema(len(_SLOT.findall(r["template"])),
                                                                None if ranked else sentences, fills))
        return GenerationRequest(instantiate.messages(document, r["template"]), sampling, seed,
                                 instantiate.schema(max_instruction_chars, max_answer_chars))

    # A document's sentences and phrases are the same for its k matches: worked out once per document.
    choices: dict[str, tuple[list[str], list[str]]] = {}

    def document_choices(doc_id: str, document: str) -> tuple[list[str], list[str]]:
        if doc_id not in choices:
            choices[doc_id] = (instantiate.document_sentences(document)
                               or [document[:instantiate.MAX_SENTENCE_CHARS]], topical_phrases(document))
        return choices[doc_id]

    requests = [request(r) for r in rows]
    required = () if released else ("fills",) if ranked else ("fills", "answer") if extract else ("instruction",
                                                                                                   "answer")

    def identify(r: dict[str, Any], prov: dict[str, str]) -> dict[str, Any]:
        return {"instantiation_id": content_id("instantiation", r["match_id"], prov), "match_id": r["match_id"],
                "doc_id": r["doc_id"], "template_id": r["template_id"], "shard": r["shard"], "run_id": run_id}

    def interpret(r: dict[str, Any], res: GenerationResult) -> tuple[dict[str, Any], str]:
        if released and not res.error and res.text.strip() == "null":
            return {}, "incompatible_template"
        obj, reason = parse_json_object(res, required)
        if obj is None:
            return {}, reason
        if extract:
            fills, picked = obj["fills"], [] if ranked else obj["answer"]
            if not (isinstance(fills, list) and isinstance(picked, list)) or \
                    len(fills) != len(_SLOT.findall(r["template"])):
                return {}, "missing_field"
            instruction, reason = fill_template(r["template"], [str(f) for f in fills])
            if reason:
                return {}, reason
            if ranked:  # the sentences that answer the filled instruction best, as the document orders them
                sentences = choices[r["doc_id"]][0]
                best = set(rank_answers(instruction, sentences)[:RANKED_ANSWER_SENTENCES])  # type: ignore[misc]
                picked = [s for s in sentences if s in best]
            obj = {"instruction": instruction, "answer": " ".join(dict.fromkeys(str(p) for p in picked))}
        if released:  # key names other releases use for the same two fields
            obj = {"instruction": _first_key(obj, RELEASED_INSTRUCTION_KEYS),
                   "answer": _first_key(obj, RELEASED_ANSWER_KEYS)}
            if obj["instruction"] is None or obj["answer"] is None:
                return {}, "missing_field"
        instruction, answer = str(obj["instruction"]).strip(), str(obj["answer"]).strip()
        answer, reason = expand_excerpts(answer, r["text"])  # verified against the full document
        if reason:
            return {}, reason
        reason = gate_instantiation(instruction, answer, r["template"], min_instruction_words,
                                    min_answer_words) or ""
        return {"instruction": instruction, "answer": answer, "grounding": grounding(answer, r["text"]),
                **fill_signals(instruction, r["template"], r["text"], answer)}, reason

    kept, quarantined = run_generation_stage(rows, requests, llm, version, sampling, identify, interpret, stats)
    schema = {k: v for k, v in INSTANTIATION_SCHEMA.items()
              if k not in ("relevance", "relevance_baseline", "relevance_model")}
    scored = score_relevance(frame(kept, schema), relevance, relevance_model, relevance_baseline)
    return scored.select(list(INSTANTIATION_SCHEMA)), frame(quarantined, BASE_SCHEMA | QUARANTINE_EXTRA), stats
