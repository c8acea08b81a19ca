"""Control pairs: chosen by content hash, a swapped answer from another document grounded against its own, a
near-miss passage of the same document the answer did not use, judged in the same engine calls as the real pairs,
and gated like them; the AUC and figures they give."""

import json
import math
from dataclasses import replace

import polars as pl
import pytest

from fineinstructions_dagster.llm.cache import GenerationStats
from fineinstructions_dagster.llm.engines import SamplingConfig
from fineinstructions_dagster.stages.controls import (
    CONTROL_SCHEMA,
    auc,
    build_controls,
    control_figures,
    controls_in_chunk,
    near_miss_passage,
)
from fineinstructions_dagster.stages.judging import judge_with_controls
from fineinstructions_dagster.stages.llm_calls import LLMCall
from fineinstructions_dagster.stages.pairs import Gates, gate_controls

DOC_A = ("Lists are mutable sequences. The sort method sorts a list in place and returns None. "
         "The sorted function returns a new sorted list from any iterable. Tuples are immutable sequences "
         "that cannot be changed after they are created. Dictionaries map hashable keys to arbitrary values.")
DOC_B = ("A generator function returns an iterator that yields values lazily one at a time. Generators keep their "
         "local state between calls to next. The yield statement suspends the function and saves its state.")


def _chunk(n_per_doc: int = 3) -> pl.DataFrame:
    rows = []
    for doc, text, answer in (("dA", DOC_A, "The sort method sorts a list in place and returns None."),
                              ("dB", DOC_B, "Generators keep their local state between calls to next.")):
        for i in range(n_per_doc):
            rows.append({"instantiation_id": f"i{doc}{i}", "doc_id": doc, "shard": "s", "text": text,
                         "instruction": f"Question {i} about {doc} and its contents?", "answer": answer,
                         "template": "Question <fi>n</fi> about <fi>a document</fi> and its contents?"})
    return pl.DataFrame(rows)


@pytest.mark.parametrize("rows,shard,share,minimum,expected", [
    (100, 100, 0.02, 20, 20),     # the minimum, in a one-chunk shard
    (1000, 10_000, 0.02, 20, 20),  # 2% of the chunk beats its part of the minimum (2)
    (100, 1000, 0.0, 20, 2),      # a tenth of the shard: a tenth of the minimum
    (5, 5, 0.02, 20, 5),          # never more than the chunk has
    (0, 0, 0.02, 20, 0),
    (50, 50, 0.0, 0, 0),          # switched off
])
def test_how_many_pairs_of_a_chunk_get_controls(rows, shard, share, minimum, expected):
    assert controls_in_chunk(rows, shard, share, minimum) == expected


def test_swapped_and_near_miss_twins():
    chunk = _chunk()
    controls = build_controls(chunk, 6, "run1", min_answer_words=4)
    assert set(controls.columns) == set(CONTROL_SCHEMA)
    swapped = controls.filter(pl.col("control_kind") == "swapped")
    near = controls.filter(pl.col("control_kind") == "near_miss")
    assert swapped.height == 6 and near.height == 6
    own = dict(zip(chunk["instantiation_id"], chunk["doc_id"], strict=True))
    answers = dict(zip(chunk["doc_id"], chunk["answer"], strict=True))
    for r in swapped.iter_rows(named=True):
        # another document's answer, judged and grounded against that document: a real quote of it
        assert r["doc_id"] != r["instruction_doc_id"] == own[r["instantiation_id"]]
        assert r["answer"] == answers[r["doc_id"]] and r["grounding"] == 1.0
    for r in near.iter_rows(named=True):
        text = DOC_A if r["doc_id"] == "dA" else DOC_B
        assert r["doc_id"] == r["instruction_doc_id"] and r["answer"] in text and r["answer"] != answers[r["doc_id"]]
        assert "sort method" not in r["answer"] and "local state" not in r["answer"]  # not the passage it used
    assert controls["gate_reason"].is_null().all() and controls["score"].is_null().all()


def test_a_swapped_twin_s_fills_are_read_against_the_answer_s_document():
    # Instructions filled from their own documents ("sort", "list" are in DOC_A only): against DOC_B the swapped
    # twin's fills are not found, the near miss's (same document) are.
    chunk = _chunk(2).with_columns(
        pl.when(pl.col("doc_id") == "dA").then(pl.lit("How do I sort a list in place?"))
        .otherwise(pl.lit("How do generators keep their local state?")).alias("instruction"),
        pl.lit("How do I <fi>do something</fi> with <fi>a thing</fi>?").alias("template"))
    controls = build_controls(chunk, 4, "r", min_answer_words=4)
    fills = dict(zip(controls["control_kind"] + "/" + controls["instruction_doc_id"], controls["fill_in_document"],
                     strict=True))
    assert fills["swapped/dA"] == 0.0 and fills["swapped/dB"] < 0.5
    assert fills["near_miss/dA"] == fills["near_miss/dB"] == 1.0
    assert controls["fill_in_answer"].is_not_null().all()


def test_controls_are_chosen_by_content_hash_whatever_the_row_order():
    chunk = _chunk(5)
    one = build_controls(chunk, 3, "r", min_answer_words=4)
    two = build_controls(chunk.reverse(), 3, "r", min_answer_words=4)
    assert one.sort("control_id").equals(two.sort("control_id")) and one.height == 6
    assert one["control_id"].is_unique().all()


def test_no_swapped_twin_without_another_document_and_no_near_miss_without_an_unused_passage():
    single = _chunk().filter(pl.col("doc_id") == "dA")
    controls = build_controls(single, 3, "r", min_answer_words=4)
    assert set(controls["control_kind"]) == {"near_miss"}
    assert near_miss_passage("Only one sentence here that is the answer.", "Only one sentence here that is the "
                             "answer.", "k", 1) is None


def test_relevance_is_scored_for_each_control():
    controls = build_controls(_chunk(), 2, "r", 4, 1, relevance=lambda q, a: [float(len(x)) for x in a],
                              relevance_model="m:bi-encoder")
    assert controls["relevance"].to_list() == [float(len(a)) for a in controls["answer"]]
    assert set(controls["relevance_model"]) == {"m:bi-encoder"}


def test_wilson_lower_bound():
    from fineinstructions_dagster.stages.controls import wilson_lower_bound

    assert wilson_lower_bound(0, 0) == 0.0 and wilson_lower_bound(0, 50) == 0.0
    assert 0.69 < wilson_lower_bound(10, 10) < 0.73
    assert 0.10 < wilson_lower_bound(60, 400) < 0.13 < 0.15


def test_auc():
    assert auc(pl.Series([3, 4, 5]), pl.Series([1, 2])) == 1.0
    assert auc(pl.Series([1, 2]), pl.Series([3, 4, 5])) == 0.0
    assert auc(pl.Series([5, 5]), pl.Series([5, 5, 5])) == 0.5  # ties count half
    assert auc(pl.Series([0.9, 0.2]), pl.Series([0.5])) == 0.5
    assert auc(pl.Series([], dtype=pl.Float64), pl.Series([1.0])) is None
    assert auc(pl.Series([1.0, None]), pl.Series([0.0, None])) == 1.0  # nulls left out


def test_control_figures():
    true = pl.DataFrame({"judge_score": [5, 5, 4, 2], "grounding": [1.0] * 4, "relevance": [0.8, 0.7, 0.6, 0.1],
                         "kept": [True, True, True, False]})
    controls = pl.DataFrame({"control_kind": ["swapped", "swapped", "near_miss", "near_miss"],
                             "judge_score": [5, 5, 5, 3], "grounding": [1.0] * 4, "relevance": [0.1, 0.2, 0.5, 0.3],
                             "kept": [False, False, True, False]})
    f = control_figures(true, controls)
    assert f["true_kept_share"] == 0.75 and f["controls"] == 4 and f["controls_kept"] == 1
    assert f["swapped"]["kept_share"] == 0.0 and f["near_miss"]["kept_share"] == 0.5
    assert f["swapped"]["grounding_auc"] == 0.5  # grounding cannot give a swapped answer away
    assert f["kept_relevance_auc_swapped"] == 1.0 and f["kept_mean_relevance"] == 0.7
    empty = control_figures(true, pl.DataFrame(schema={c: pl.Float64 for c in controls.columns}
                                               | {"control_kind": pl.String, "kept": pl.Boolean}))
    assert empty["controls"] == 0 and empty["swapped"]["kept_share"] is None


def test_controls_go_through_the_same_gates():
    gates = Gates(judge_threshold=4, min_grounding=0.6, min_relevance=0.3, min_fill_in_document=0.5,
                  min_fill_in_answer=0.25, min_relevance_margin=0.2)
    base = {c: None for c in CONTROL_SCHEMA} | {"instruction": "How do I sort a list in place?", "answer": "x y z",
                                               "grounding": 1.0, "control_kind": "swapped", "relevance_baseline": 0.3,
                                               "fill_in_document": 1.0, "fill_in_answer": 1.0}
    rows = [base | {"control_id": "c1", "score": 5, "relevance": 0.9},  # passes: the gates are not filtering
            base | {"control_id": "c2", "score": 5, "relevance": 0.1},
            base | {"control_id": "c3", "score": 2, "relevance": 0.9},
            base | {"control_id": "c4", "score": None, "relevance": 0.9, "judge_reason": "unparseable_json"},
            base | {"control_id": "c5", "score": None, "relevance": None, "gate_reason": "answer_too_short"},
            base | {"control_id": "c6", "score": 5, "relevance": None},
            base | {"control_id": "c7", "score": 5, "relevance": 0.9, "fill_in_document": 0.0},
            base | {"control_id": "c8", "score": 5, "relevance": 0.9, "fill_in_answer": 0.0},
            # relevant in absolute terms, but no more than other documents' answers are to this instruction
            base | {"control_id": "c9", "score": 5, "relevance": 0.45},
            base | {"control_id": "c10", "score": 5, "relevance": 0.9, "relevance_baseline": None}]
    outcomes, stats = gate_controls(pl.DataFrame(rows, schema=CONTROL_SCHEMA), gates)
    reasons = dict(zip(outcomes["control_id"], outcomes["reason"], strict=True))
    assert reasons == {"c1": None, "c2": "below_relevance_threshold", "c3": "below_judge_threshold",
                       "c4": "unparseable_json", "c5": "answer_too_short", "c6": "below_relevance_threshold",
                       "c7": "fill_not_in_document", "c8": "fill_not_in_answer", "c9": "below_relevance_margin",
                       "c10": "relevance_baseline_unmeasured"}
    assert outcomes.filter(pl.col("control_id") == "c5")["judged"].to_list() == [False]
    assert stats.kept == 1 and stats.total == 10
    assert set(outcomes["selected_min_relevance"]) == {0.3} and set(outcomes["selected_min_relevance_margin"]) == {0.2}
    assert outcomes.filter(pl.col("control_id") == "c9")["relevance_margin"].round(4).to_list() == [0.15]
    # the margin gate off (-inf, the smoke profile's): an unmeasured baseline passes
    off, _ = gate_controls(pl.DataFrame(rows, schema=CONTROL_SCHEMA), replace(gates, min_relevance_margin=-math.inf))
    assert off.filter(pl.col("control_id").is_in(["c9", "c10"]))["kept"].to_list() == [True, True]


def test_controls_are_judged_in_the_same_engine_calls_as_the_pairs(fake_engine):
    chunk = _chunk()
    controls = build_controls(chunk, 2, "r", min_answer_words=4)
    seen = []
    engine = fake_engine(lambda r: seen.append(r) or json.dumps({"feedback": "fine", "score": 4}))
    kept, quarantined, judged, stats = judge_with_controls(
        chunk, controls, chunk.select("doc_id", "text"), LLMCall(engine, None, GenerationStats()), SamplingConfig(),
        2000, 200)
    assert engine.calls == 1 and engine.requests == chunk.height + controls.height  # one batch for both
    assert kept.height == chunk.height and set(kept["instantiation_id"]) == set(chunk["instantiation_id"])
    assert judged["score"].to_list() == [4] * controls.height and judged["judgement_id"].is_not_null().all()
    assert stats.total == chunk.height and stats.kept == chunk.height
    assert stats.extra["control_pairs_judged"] == controls.height
    assert stats.extra["engine_requests"] == chunk.height + controls.height  # billed like every request
    # a swapped control is judged against its answer's document, not the instruction's
    swapped = judged.filter(pl.col("control_kind") == "swapped").row(0, named=True)
    prompt = next(r for r in seen if swapped["answer"] in r.chat()[-1]["content"]
                  and swapped["instruction"] in r.chat()[-1]["content"])
    own_text = DOC_B if swapped["doc_id"] == "dB" else DOC_A
    assert own_text[:40] in prompt.chat()[-1]["content"]


def test_the_control_check_fails_a_shard_whose_gates_keep_its_controls():
    from dagster import AssetCheckSeverity

    from fineinstructions_dagster.defs.pairs.assets import control_check

    ok = control_check(40, 2, 0.1, True, "s1")
    assert ok.passed and "kept 2 of 40" in ok.description
    assert control_check(10, 2, 0.1, True, "s1").passed  # 20% of 10: not shown to be above 10%
    assert not control_check(10, 10, 0.1, True, "s1").passed  # all of 10: shown
    assert not control_check(400, 60, 0.1, True, "s1").passed  # 15% of 400: shown
    bad = control_check(40, 30, 0.1, True, "s1")
    assert not bad.passed and bad.severity == AssetCheckSeverity.ERROR
    assert "shard s1" in bad.description and "not filtering" in bad.description
    relaxed = control_check(40, 30, 0.1, False, "s1")  # the smoke profile: said, not blocking
    assert relaxed.passed and relaxed.severity == AssetCheckSeverity.WARN and "warning only" in relaxed.description
    assert control_check(0, 0, 0.1, True, "s1").passed  # nothing to measure is said, not failed
    assert "not measured" in control_check(0, 0, 0.1, True, "s1").description
