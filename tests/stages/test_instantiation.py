import json

import polars as pl
import pytest

from fineinstructions_dagster.llm.cache import GenerationStats
from fineinstructions_dagster.llm.engines import SamplingConfig
from fineinstructions_dagster.stages.instantiation import gate_instantiation, grounding, instantiate_matches
from fineinstructions_dagster.stages.llm_calls import LLMCall

DOC = "Lists are mutable sequences. The sort method sorts the list in place and returns None."


def test_grounding_counts_copied_spans():
    assert grounding("The sort method sorts the list in place", DOC) == 1.0
    assert grounding("Bananas are yellow and tasty fruit", DOC) == 0.0
    # 4 of 8 answer words sit inside a copied run of >= 3 words
    assert grounding("the sort method sorts quickly, honestly, very much", DOC) == pytest.approx(4 / 8)
    assert grounding("", DOC) == 0.0
    assert grounding("Lists", DOC) == 1.0 and grounding("Tuples", DOC) == 0.0


@pytest.mark.parametrize("instruction,answer,reason", [
    ("Explain sorting", "  ", "empty_answer"),
    ("", "an answer", "empty_instruction"),
    ("How do I sort <fi>a container</fi>?", "an answer", "unfilled_slot"),
    ("How do I sort a container ?", "an answer", "copies_template"),
])
def test_each_gate(instruction, answer, reason):
    assert gate_instantiation(instruction, answer, "How do I sort a container ?") == reason


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
