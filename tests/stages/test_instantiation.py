import json

import polars as pl
import pytest

from fineinstructions_dagster.llm.cache import GenerationStats
from fineinstructions_dagster.llm.engines import SamplingConfig
from fineinstructions_dagster.stages.instantiation import (
    expand_excerpts,
    fill_coverage,
    gate_instantiation,
    grounding,
    instantiate_matches,
)
from fineinstructions_dagster.stages.llm_calls import LLMCall

DOC = "Lists are mutable sequences. The sort method sorts the list in place and returns None."


def test_grounding_counts_copied_spans():
    assert grounding("The sort method sorts the list in place", DOC) == 1.0
    assert grounding("Bananas are yellow and tasty fruit", DOC) == 0.0
    # 4 of 8 answer words sit inside a copied run of >= 3 words
    assert grounding("the sort method sorts quickly, honestly, very much", DOC) == pytest.approx(4 / 8)
    assert grounding("", DOC) == 0.0
    # too short to hold a quoted span: no grounding, even when found verbatim
    assert grounding("Lists", DOC) == 0.0 and grounding("sort method", DOC) == 0.0


@pytest.mark.parametrize("instruction,answer,reason", [
    ("Explain sorting", "  ", "empty_answer"),
    ("", "an answer", "empty_instruction"),
    ("How do I sort <fi>a container</fi>?", "an answer", "unfilled_slot"),
    ("How do I sort a container ?", "an answer", "copies_template"),
])
def test_each_gate(instruction, answer, reason):
    assert gate_instantiation(instruction, answer, "How do I sort a container ?") == reason


def test_fill_coverage_reads_only_what_the_slots_added():
    template = "How do I sort <fi>a container</fi> in <fi>a language</fi>?"
    # the fills' words ("lists" counting as "list"), not the template's fixed words or function words
    assert fill_coverage("How do I sort lists in place?", template, DOC) == 1.0
    assert fill_coverage("How do I sort the list in Rust?", template, DOC) == 0.5
    assert fill_coverage("How do I sort dictionaries in Rust?", template, DOC) == 0.0
    assert fill_coverage("How do I sort it in a way?", template, DOC) == 1.0  # nothing specific to check
    assert fill_coverage("How do I sort Lists in place?", template, "lists sort in place") == 1.0  # any case


def test_instantiation_keeps_good_rows_and_quarantines_the_rest(fake_engine):
    replies = {"m1": json.dumps({"instruction": "How do I sort a list?", "answer": "The sort method sorts the "
                                 "list in place and returns None."}),
               "m2": json.dumps({"instruction": "How do I sort <fi>x</fi>?", "answer": "x"}),
               "m3": "not json"}
    pending = pl.DataFrame({"match_id": ["m1", "m2", "m3"], "doc_id": "d1", "template_id": "t1", "shard": "s",
                            "text": DOC, "template": "How do I sort <fi>a container</fi>?"})
    by_seed = {}

    def respond(r):
        return by_seed.get(r.seed) or by_seed[r.seed - 1]  # a repair turn (seed + 1) gets the same reply

    from fineinstructions_dagster.stages.llm_calls import seed_for
    by_seed.update({seed_for(m): replies[m] for m in replies})
    kept, quarantined, stats = instantiate_matches(pending, LLMCall(fake_engine(respond), None, GenerationStats()),
                                                   SamplingConfig(), 2000, 400, 400, run_id="r")
    assert kept["match_id"].to_list() == ["m1"] and kept["grounding"][0] == 1.0
    assert dict(zip(quarantined["match_id"], quarantined["reason"], strict=True)) == {
        "m2": "unfilled_slot", "m3": "unparseable_json"}
    assert stats.as_dict()["dropped"] == 2
    # the document is fenced and comes before the template: k prompts per document share a prefix
    assert kept["prompt"][0].index("<document>") < kept["prompt"][0].index("<template>")


EXCERPT_DOC = ("Lists have a sort() method that modifies the list in-place.\nThere is also a sorted() built-in "
               "function that builds a new sorted list from an iterable. Both accept key and reverse.")


@pytest.mark.parametrize("answer,expected", [
    ("Use <excerpt>There is also<...>from an iterable.</excerpt>",
     "Use There is also a sorted() built-in function that builds a new sorted list from an iterable."),
    ("<excerpt>modifies the list in-place. There is</excerpt> more.",  # verbatim, across a line break
     "modifies the list in-place.\nThere is more."),
    ("No markers at all.", "No markers at all."),
    ("<excerpt>Lists have<...>in-place.</excerpt> <excerpt>Both accept key and reverse.</excerpt>",
     "Lists have a sort() method that modifies the list in-place. Both accept key and reverse."),
])
def test_excerpts_expand_from_the_document(answer, expected):
    assert expand_excerpts(answer, EXCERPT_DOC) == (expected, "")


@pytest.mark.parametrize("answer,reason", [
    ("<excerpt>Lists are immutable tuples</excerpt>", "excerpt_not_in_document"),  # a forged quote
    ("<excerpt>There is also<...>a hash table.</excerpt>", "excerpt_not_in_document"),
    ("<excerpt>from an iterable.<...>Lists have</excerpt>", "excerpt_not_in_document"),  # end before start
    ("<excerpt>Lists have", "malformed_excerpt"),
    ("<excerpt></excerpt>", "malformed_excerpt"),
    ("<excerpt>Lists have<...></excerpt>", "malformed_excerpt"),
])
def test_bad_excerpts_are_caught(answer, reason):
    assert expand_excerpts(answer, EXCERPT_DOC) == (answer, reason)


def test_excerpt_markers_in_the_stage(fake_engine):
    from fineinstructions_dagster.stages.llm_calls import seed_for

    replies = {seed_for("m1"): json.dumps({"instruction": "How do I get a new sorted list?",
                                           "answer": "<excerpt>There is also<...>from an iterable.</excerpt>"}),
               seed_for("m2"): json.dumps({"instruction": "Are lists sorted?",
                                           "answer": "<excerpt>Lists are always kept sorted.</excerpt>"})}
    pending = pl.DataFrame({"match_id": ["m1", "m2"], "doc_id": "d1", "template_id": "t1", "shard": "s",
                            "text": EXCERPT_DOC, "template": "How do I <fi>task</fi>?"})
    engine = fake_engine(lambda r: replies.get(r.seed) or replies[r.seed - 1])
    kept, quarantined, _ = instantiate_matches(pending, LLMCall(engine, None, GenerationStats()), SamplingConfig(),
                                               2000, 400, 400)
    assert kept["answer"].to_list() == [
        "There is also a sorted() built-in function that builds a new sorted list from an iterable."]
    assert kept["grounding"][0] == 1.0 and "<excerpt>" in kept["raw_output"][0]  # raw output kept as written
    assert quarantined["reason"].to_list() == ["excerpt_not_in_document"]


def test_ambiguous_excerpt_is_rejected():
    doc = "Step one: open the file. Then close it. Later: open the socket. Then close it."
    assert expand_excerpts("<excerpt>open the<...>close it.</excerpt>", doc)[1] == "ambiguous_excerpt"
    assert expand_excerpts("<excerpt>open the file.<...>close it.</excerpt>", doc) == (
        "open the file. Then close it.", "")
    assert expand_excerpts("<excerpt>Then close it.</excerpt>", doc) == ("Then close it.", "")  # same text twice


def test_released_instantiator_format(fake_engine):
    from fineinstructions_dagster.prompts import instantiate

    seen = []

    def respond(r):
        seen.append(r)
        if "sockets" in r.messages[0][1]:
            return "null"  # the released model's answer for a template that does not fit
        return json.dumps({"query": "How do I get a new sorted list?",  # an alias of "instruction"
                           "response": "<excerpt>There is also<...>from an iterable.</excerpt>"})

    pending = pl.DataFrame({"match_id": ["m1", "m2"], "doc_id": "d1", "template_id": ["t1", "t2"], "shard": "s",
                            "text": EXCERPT_DOC,
                            "template": ["How do I <fi>task</fi>?", "How are <fi>sockets</fi> closed?"]})
    kept, quarantined, _ = instantiate_matches(pending, LLMCall(fake_engine(respond), None, GenerationStats()),
                                               SamplingConfig(), 2000, 400, 400, prompt_format="template_instantiator")
    payload = json.loads(seen[0].messages[0][1])
    assert [role for role, _ in seen[0].messages] == ["user"] and set(payload) == {"instruction_template", "document"}
    assert seen[0].json_schema is None  # `null` must stay possible
    assert kept["prompt_version"].to_list() == [instantiate.RELEASED_PROMPT_VERSION]
    assert kept["instruction"].to_list() == ["How do I get a new sorted list?"]
    assert kept["answer"][0].startswith("There is also a sorted()")
    assert quarantined["reason"].to_list() == ["incompatible_template"]


def test_excerpt_edge_cases():
    doc = "the quick brown fox saw the lazy dog. Other text."
    # several STARTs before one END: the nearest one, not an ambiguity
    assert expand_excerpts("<excerpt>the<...>dog.</excerpt>", doc) == ("the lazy dog.", "")
    # a stray closing tag between markers is malformed, not passed into the answer
    assert expand_excerpts("a </excerpt> b <excerpt>quick brown</excerpt>", doc)[1] == "malformed_excerpt"
    # words are matched whole: "he" is not found inside "the"
    assert expand_excerpts("<excerpt>he quick</excerpt>", doc)[1] == "excerpt_not_in_document"


LONG_DOC = ("Generators are a simple and powerful tool for creating iterators. Generators are written like regular "
            "functions but use the yield statement whenever they want to return data. Each time next() is called "
            "on it, the generator resumes where it left off. What makes generators so compact?")


def test_extract_format_offers_only_the_document_s_sentences_and_phrases(fake_engine):
    from fineinstructions_dagster.prompts import instantiate
    from fineinstructions_dagster.stages.llm_calls import seed_for

    first, second = instantiate.document_sentences(LONG_DOC)[:2]
    replies = {seed_for("m1"): json.dumps({"fills": ["Generators"], "answer": [first, second, first]}),
               seed_for("m2"): json.dumps({"fills": ["a tool"], "answer": [first, second]}),  # the slot's words
               seed_for("m3"): json.dumps({"fills": ["Generators"], "answer": ["Generators are a simple tool."]})}
    seen = []
    pending = pl.DataFrame({"match_id": ["m1", "m2", "m3"], "doc_id": "d1", "template_id": "t1", "shard": "s",
                            "text": LONG_DOC, "template": "How do I use <fi>a tool</fi> in Python?"})
    engine = fake_engine(lambda r: seen.append(r) or replies.get(r.seed) or replies[r.seed - 1])
    ranked = []
    kept, quarantined, _ = instantiate_matches(
        pending, LLMCall(engine, None, GenerationStats()), SamplingConfig(), 2000, 400, 800, prompt_format="extract",
        min_instruction_words=4, min_answer_words=8,
        rank_fills=lambda slot, phrases: ranked.append(slot) or sorted(phrases, key=len))
    schema = seen[0].json_schema["properties"]
    assert "What makes generators so compact?" not in schema["answer"]["items"]["enum"]  # a question: no answer
    assert set(schema["answer"]["items"]["enum"]) == set(instantiate.document_sentences(LONG_DOC))
    assert schema["fills"]["minItems"] == schema["fills"]["maxItems"] == 1 and ranked[0] == "a tool"
    assert all(p.lower() in LONG_DOC.lower() for p in schema["fills"]["items"]["enum"])
    assert len(schema["fills"]["items"]["enum"]) <= 8  # the ranker's best few per slot
    assert kept["instruction"].to_list() == ["How do I use Generators in Python?"]
    assert kept["answer"][0] == f"{first} {second}" and kept["grounding"][0] == 1.0  # the repeat dropped
    assert kept["prompt_version"][0] == instantiate.EXTRACT_PROMPT_VERSION
    # m3's sentence is not the document's: the stage measures it (a fake engine ignores the schema)
    assert dict(zip(quarantined["match_id"], quarantined["reason"], strict=True)) == {"m2": "slot_not_filled",
                                                                                     "m3": "answer_too_short"}


@pytest.mark.parametrize("instruction,answer,reason", [
    ("Why?", "The sort method sorts the list in place and returns None.", "instruction_too_short"),
    ("How do I sort a list?", "Sort it.", "answer_too_short"),
    ("How do I sort a list?", "the list the list the list the list the list the list the list", "repetitive_output"),
    ("How do I sort a list?", "The sort method sorts the list in place and returns None.", None),
])
def test_length_and_repetition_gates(instruction, answer, reason):
    assert gate_instantiation(instruction, answer, "How do I sort <fi>x</fi>?", 4, 8) == reason
