import json

import polars as pl
import pytest

from fineinstructions_dagster.llm.cache import GenerationStats
from fineinstructions_dagster.llm.engines import SamplingConfig
from fineinstructions_dagster.stages.llm_calls import LLMCall
from fineinstructions_dagster.stages.templates import build_template_bank, genericize_queries, validate_template


@pytest.mark.parametrize("template,description,reason", [
    ("", "d", "empty_template"),
    ("x" * 500, "d", "template_too_long"),
    ("How do I <fi>thing</fi></fi>?", "d", "unbalanced_slot_tags"),
    ("How do I <fi>thing?", "d", "unbalanced_slot_tags"),
    ("How <fi>a <fi>b</fi></fi>?", "d", "nested_slot_tags"),
    ("How do I sort a list?", "d", "no_slot"),
    ("How do I <fi> </fi>?", "d", "empty_slot"),
    ("<fi>anything</fi>", "d", "only_slots"),
    ("How do I <fi>task</fi>?", " ", "empty_description"),
])
def test_each_validation_reason(template, description, reason):
    assert validate_template(template, description, 400, 400) == reason


def test_valid_template_passes():
    assert validate_template("How do I keep my <fi>plant</fi> alive for <fi>duration</fi>?", "Plant care.",
                             400, 400) is None


def queries(texts):
    return pl.DataFrame({"query_id": [f"q{i}" for i in range(len(texts))], "source": "s", "text": texts})


def test_bad_llm_output_goes_to_quarantine_with_raw_output(fake_engine):
    doc = "Guides that explain how to cook a dish."
    outputs = {
        "How to cook risotto fast?": json.dumps({"specific": "risotto", "kind": "a dish",
                                                 "compatible_document_description": doc}),
        "How to cook pasta well?": "Sure! Here is your template: How to <fi>x</fi>",
        "How to cook rice slowly?": json.dumps({"specific": "rice", "kind": "a grain"}),
        "How to cook beans well?": "[1, 2]",
        "How to cook fish well?": json.dumps({"specific": "fish", "kind": "a baked good",
                                              "compatible_document_description": doc}),
        "How to cook eggs well?": json.dumps({"specific": "egg", "kind": "food",
                                              "compatible_document_description": doc}),
    }
    def respond(r):
        repair = "could not be used" in r.messages[-1][1]  # a repair turn gets the same reply again
        return outputs[r.messages[-3 if repair else -1][1].split("\n")[1]]

    engine = fake_engine(respond)
    kept, quarantined, stats = genericize_queries(queries(list(outputs)), LLMCall(engine, None, GenerationStats()),
                                                  SamplingConfig(), 400, 400, run_id="r")
    assert kept["template"].to_list() == ["How to cook <fi>a dish</fi> fast?"]
    assert kept["template_id"][0].startswith("t") and kept["n_slots"].to_list() == [1]
    reasons = dict(zip(quarantined["query_text"], quarantined["reason"], strict=True))
    assert reasons == {"How to cook pasta well?": "unparseable_json", "How to cook rice slowly?": "missing_field",
                       "How to cook beans well?": "not_an_object", "How to cook fish well?": "copied_example",
                       "How to cook eggs well?": "phrase_not_in_query"}  # "egg" is not a whole word there
    assert quarantined.filter(pl.col("query_text") == "How to cook pasta well?")["raw_output"][0].startswith("Sure!")
    assert stats.total == 6 and stats.kept == 1


def test_the_schema_offers_only_the_query_s_own_phrases_and_the_examples_are_elsewhere():
    from fineinstructions_dagster.prompts import genericize

    query = "Why must 'self' be used explicitly in method definitions and calls?"
    offered = genericize.schema(query, 400, 400)["properties"]["specific"]["enum"]
    assert "self" in offered and "method definitions" in offered and all(p in query for p in offered)
    assert not {"Why", "must", "in method", "and"} & set(offered)  # no run starts or ends on a function word
    assert genericize.template_from(query, "self", "a name") == \
        "Why must '<fi>a name</fi>' be used explicitly in method definitions and calls?"
    assert genericize.template_from("Can I write functions in C?", "C", "a language") == \
        "Can I write functions in <fi>a language</fi>?"  # whole words: not the C of "Can"
    # the worked examples' phrases are not in a Python question, so a model cannot copy them as its pick
    assert not {"banana bread", "a bicycle"} & set(offered)


def test_truncated_output_is_named_as_such(fake_engine):
    engine = fake_engine(lambda r: '{"template": "How to <fi>x', finish_reason="length")
    _, quarantined, _ = genericize_queries(queries(["q"]), LLMCall(engine, None, GenerationStats()),
                                           SamplingConfig(), 400, 400)
    assert quarantined["reason"].to_list() == ["truncated_output"]


def test_bank_merges_identical_templates_keeping_every_query_and_is_order_independent():
    rows = pl.DataFrame({
        "query_id": ["q2", "q1", "q3"], "source": ["b", "a", "a"], "template_id": ["t1", "t1", "t2"],
        "template": ["T1", "T1", "T2"], "compatible_document_description": ["desc from q2", "desc from q1", "d3"],
        "n_slots": [1, 1, 2], "genericization_id": ["g2", "g1", "g3"],
    })
    bank, stats = build_template_bank(rows)
    again, _ = build_template_bank(rows.reverse())
    assert bank.drop("run_id").equals(again.drop("run_id"))
    t1 = bank.filter(pl.col("template_id") == "t1").row(0, named=True)
    assert t1["query_ids"] == ["q1", "q2"] and t1["sources"] == ["a", "b"]
    assert t1["compatible_document_description"] == "desc from q1"
    assert stats.dropped["duplicate_template"] == 1


def test_empty_bank_is_a_clear_error():
    with pytest.raises(ValueError, match="template bank is empty"):
        build_template_bank(pl.DataFrame(schema={"query_id": pl.String, "template_id": pl.String}))


@pytest.mark.parametrize("template,description,query,reason", [
    ("How do I email <fi>person</fi> at jane.doe@example.com?", "Email etiquette.", None, "personal_data_email"),
    ("How do I reach <fi>a shop</fi>?", "Contact pages, e.g. call +1 (555) 123-4567.", None, "personal_data_phone"),
    ("Call 555-123-4567 about <fi>an order</fi>", "Orders.", None, "personal_data_phone"),
    ("Why <fi>x</fi>", "Docs.", None, "template_too_short"),
    ("How do I learn to cook?", "Cooking guides.", "how do I learn  to cook?", None),  # already generic
    ("How do I learn to cook?", "Cooking guides.", "How do I learn to cook risotto?", "no_slot"),
    ("What happened in <fi>year</fi> 1969?", "History of <fi>a year</fi>.", None, None),  # 4 digits: not a phone
    ("What happened between 1914-1918 in <fi>a country</fi>?", "Histories of 2023-01-15 events.", None, None),
    ("How do I install <fi>a package</fi> 1.2.3.4?", "Install guides.", None, None),
    ("What happened in <fi>e.g. 555-123-4567</fi>?", "Histories.", None, None),  # inside a slot: not checked
])
def test_personal_data_length_and_generic_queries(template, description, query, reason):
    assert validate_template(template, description, 400, 400, query=query) == reason


def test_bank_merges_near_duplicate_templates_keeping_every_query_id():
    rows = pl.DataFrame({
        "query_id": ["q1", "q2", "q3", "q4"], "source": ["a", "b", "a", "b"],
        "template_id": ["t1", "t2", "t3", "t4"],
        "template": ["How do I sort <fi>a list</fi>?", "how do I sort <fi>A list</fi>",
                     "How do I  sort <fi>a  list</fi> ?!", "How do I sort <fi>a disease</fi>?"],
        "compatible_document_description": ["d1", "d2", "d3", "d4"], "n_slots": 1,
        "genericization_id": ["g1", "g2", "g3", "g4"],
    })
    bank, stats = build_template_bank(rows)
    assert bank.height == 2 and stats.dropped["near_duplicate_template"] == 2 and stats.kept == 2
    sort = bank.filter(pl.col("template_id") == "t1").row(0, named=True)
    assert sort["query_ids"] == ["q1", "q2", "q3"] and sort["merged_template_ids"] == ["t1", "t2", "t3"]
    assert sort["template"] == "How do I sort <fi>a list</fi>?" and sort["n_queries"] == 3
    stats.check_balanced()
    # different slots, or text that differs in more than case and punctuation, are different templates
    other = pl.DataFrame({"query_id": ["q1", "q2", "q3", "q4"], "source": "a", "template_id": ["a", "b", "c", "d"],
                          "template": ["What is <fi>a Python library</fi>?", "what is <fi>a disease</fi>",
                                       "How to learn C++ as <fi>a beginner</fi>?",
                                       "How to learn C as <fi>a beginner</fi>?"],
                          "compatible_document_description": "d", "n_slots": 1, "genericization_id": "g"})
    assert build_template_bank(other)[0].height == 4


def test_released_templatizer_format_sends_the_bare_query(fake_engine):
    from fineinstructions_dagster.prompts import genericize

    seen = []
    engine = fake_engine(lambda r: seen.append(r) or json.dumps(
        {"template": "How to <fi>x</fi>?", "compatible_document_description": "Docs on x.", "extra": 1}))
    kept, _, _ = genericize_queries(queries(["How to sort a list?"]), LLMCall(engine, None, GenerationStats()),
                                    SamplingConfig(), 400, 400, prompt_format="query_templatizer")
    assert seen[0].messages == (("user", "How to sort a list?"),) and seen[0].json_schema is None
    assert kept["prompt_version"].to_list() == [genericize.RELEASED_PROMPT_VERSION] and kept.height == 1
    with pytest.raises(ValueError, match="prompt_format"):
        genericize_queries(queries(["q"]), LLMCall(engine, None, GenerationStats()), SamplingConfig(), 400, 400,
                           prompt_format="chatml")
