"""The dataset report's quality figures per LLM stage, and the profiles they are read against."""

import polars as pl
import pytest

from fineinstructions_dagster.config import PROFILES, PipelineConfig, model_prompt_format, profile_config
from fineinstructions_dagster.stages.report import REPAIR_MARK, stage_quality

PAPER = {"judge_threshold": 4, "min_grounding": 0.6, "min_instruction_words": 4, "min_answer_words": 8}


def test_quality_figures_per_stage():
    templates = pl.DataFrame({"query_id": ["q1", "q2"], "query_text": ["Why x?", "How y?"],
                              "template": ["Why <fi>a</fi>?", "How <fi>b</fi> <fi>c</fi>?"], "n_slots": [1, 2],
                              "prompt": ["p", f"p {REPAIR_MARK}"]})
    inst = pl.DataFrame({"instantiation_id": ["i1", "i2", "i3"], "grounding": [1.0, 0.1, 0.7],
                         "instruction": ["How do I sort a list?", "How do I sort a list?", "Why?"],
                         "answer": ["one two three four five six seven eight", "short answer here", "a b c d e f g h"],
                         "prompt": ["p", "p", "p"]})
    judged = pl.DataFrame({"instantiation_id": ["i1", "i2", "i3"], "score": [5, 5, 2], "feedback": ["f"] * 3,
                           "prompt": ["p"] * 3})
    pairs = pl.DataFrame({"pair_id": ["p1"], "instruction": ["How do I sort a list?"], "answer": ["x"],
                          "judge_score": [5], "grounding": [1.0]})
    rejections = {"templates": {"unparseable_json": 1, "no_slot": 1}, "instantiations": {"answer_too_short": 1}}
    q = stage_quality(templates.lazy(), inst.lazy(), judged.lazy(), pairs, rejections, 4, 0.6, PAPER)
    t = q["templates"]
    assert t["outputs"] == 4 and t["parse_rate"] == 0.75 and t["repair_rate"] == 0.25
    assert t["slots_per_template"] == {1: 1, 2: 1} and len(t["samples"]) == 2
    assert q["instantiations"]["grounding_histogram"] == {"0.0+": 1, "0.2+": 0, "0.4+": 0, "0.6+": 1, "0.8+": 1}
    j = q["judgements"]
    assert j["score_histogram"] == {2: 1, 5: 2}
    # the ungrounded answer (0.1) scored 5: the judge did not see what grounding saw
    assert j["low_grounding_pairs"] == 1 and j["low_grounding_scored_at_or_above_threshold"] == 1
    assert j["score_grounding_correlation"] is not None
    # the paper's gates keep i1 only: i2 is ungrounded and 3 words long, i3 scored 2 with a one-word instruction
    assert q["gates"] == {"pairs_kept_by_this_profile": 1, "pairs_the_paper_gates_would_keep": 1, "judged_pairs": 3}


@pytest.mark.parametrize("model,role,expected", [
    ("fineinstructions/query_templatizer", "genericizer", "query_templatizer"),
    ("/models/fineinstructions--template_instantiator", "instantiator", "template_instantiator"),
    ("flowaicom/Flow-Judge-v0.1", "judge", "flow"),
    ("models/smollm2-135m-instruct", "genericizer", "instruct"),
    ("meta-llama/Llama-3.2-1B-Instruct", "instantiator", "instruct"),
    ("meta-llama/Llama-3.2-1B-Instruct", "judge", "json"),
])
def test_the_prompt_format_follows_the_model(model, role, expected):
    assert model_prompt_format(role, model) == expected
    assert PipelineConfig().format_for(role, model) == expected


def test_profiles():
    assert PROFILES == ("paper", "demo", "smoke")
    demo, paper, smoke = profile_config("demo"), profile_config("paper"), profile_config("smoke")
    # the demo's small-model formats are configuration; its grounding gate is the paper's, its judge (measured at
    # chance) does not gate, and its relevance margin is measured
    assert demo.format_for("instantiator", "any/model") == "extract"
    assert demo.format_for("judge", "any/model") == "checklist"
    assert demo.min_grounding == paper.min_grounding and demo.judge_threshold == 1 < paper.judge_threshold
    assert demo.min_relevance_margin > paper.min_relevance_margin == 0.0
    assert smoke.min_relevance_margin == float("-inf")
    assert smoke.judge_threshold == 1 and smoke.min_grounding == 0.0
    assert "SmolLM2-135M-Instruct" in demo.describe_relaxations() and "SMOKE" in smoke.describe_relaxations()
    assert paper.describe_relaxations() == ""
    with pytest.raises(ValueError, match="judge_format"):
        PipelineConfig(judge_format="likert")
