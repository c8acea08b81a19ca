"""The relevance signal: the packaged bi-encoder scores an answer to the question above a passage about something
else; a CrossEncoder checkpoint is recognised and scored pair by pair; the extractive format offers the sentences
the ranker puts first."""

import json

import numpy as np
import polars as pl

from fineinstructions_dagster.llm.cache import GenerationStats
from fineinstructions_dagster.llm.engines import SamplingConfig
from fineinstructions_dagster.stages.instantiation import ANSWER_CHOICES, instantiate_matches, template_as_question
from fineinstructions_dagster.stages.llm_calls import LLMCall
from fineinstructions_dagster.stages.relevance import RelevanceScorer, looks_like_cross_encoder


def test_the_packaged_bi_encoder_scores_an_answer_above_an_unrelated_passage():
    scorer = RelevanceScorer()
    q = "How do I sort a list in place in Python?"
    right, wrong = ("The sort method sorts the list in place and returns None.",
                    "The yield statement suspends a generator function and saves its local state.")
    scores = scorer.score([q, q], [right, wrong])
    assert scores[0] > scores[1] + 0.2 and scorer.kind == "bi-encoder"
    assert scorer.rank(q, [wrong, right]) == [right, wrong]
    assert scorer.name.endswith(":bi-encoder") and len(scorer.score([], [])) == 0


def test_an_instruction_s_baseline_is_its_mean_relevance_of_other_documents_answers(tmp_path):
    from sentence_transformers import CrossEncoder

    from fineinstructions_dagster.stages.embedding import default_embedder_path
    from fineinstructions_dagster.stages.relevance import MIN_BASELINE_ANSWERS

    scorer = RelevanceScorer()
    answers = [f"Answer {i} explains how the {w} module handles its files." for i, w in
               enumerate(["os", "io", "csv", "json", "gzip", "zipfile", "shutil"])]
    docs = ["d0", "d0", "d1", "d2", "d3", "d4", "d5"]
    q = ["How does the os module read files?", "What does the json module do?"]
    base = scorer.baseline(q, ["d0", "d3"], answers, docs)
    for row, own in enumerate(["d0", "d3"]):  # the plain mean of the scores of every answer of another document
        others = [a for a, d in zip(answers, docs, strict=True) if d != own]
        assert abs(base[row] - scorer.score([q[row]] * len(others), others).mean()) < 1e-5
    # too few answers from other documents: unmeasured (NaN), never a mean of one or two
    few_docs = ["d0"] * 2 + ["dx"] * (MIN_BASELINE_ANSWERS - 2)
    few = scorer.baseline(q[:1], ["d0"], answers[:MIN_BASELINE_ANSWERS], few_docs)
    assert np.isnan(few[0])
    # a CrossEncoder scores the same quantity on a hash sample of the other answers, pair by pair
    CrossEncoder(default_embedder_path(), num_labels=1).save(str(tmp_path / "reranker"))
    cross = RelevanceScorer(str(tmp_path / "reranker")).baseline(q, ["d0", "d3"], answers, docs)
    assert cross.shape == (2,) and not np.isnan(cross).any()


def test_a_cross_encoder_checkpoint_is_used_as_a_reranker(tmp_path):
    from sentence_transformers import CrossEncoder

    from fineinstructions_dagster.stages.embedding import default_embedder_path

    # MiniLM's encoder with a fresh one-logit head: the shape of a reranker checkpoint (its scores are noise here)
    CrossEncoder(default_embedder_path(), num_labels=1).save(str(tmp_path / "reranker"))
    assert looks_like_cross_encoder(str(tmp_path / "reranker"))
    scorer = RelevanceScorer(str(tmp_path / "reranker"))
    assert scorer.kind == "cross-encoder"
    assert scorer.score(["q one", "q two", "q three"], ["a", "b", "c"]).shape == (3,)


def test_extract_offers_the_best_ranked_sentences_first(fake_engine):
    doc = " ".join(f"Sentence number {i} talks about topic {i} at some length here." for i in range(20))
    seen, asked = [], []
    engine = fake_engine(lambda r: seen.append(r) or json.dumps({"fills": ["topic 3"], "answer": []}))

    def rank(query: str, sentences: list[str]) -> list[str]:
        asked.append(query)
        return sorted(sentences, key=lambda s: -int(s.split()[2]))  # highest number first

    pending = pl.DataFrame({"match_id": ["m1"], "doc_id": "d1", "template_id": "t1", "shard": "s", "text": doc,
                            "template": "What does <fi>a topic</fi> mean?"})
    instantiate_matches(pending, LLMCall(engine, None, GenerationStats()), SamplingConfig(), 4000, 400, 800,
                        prompt_format="extract", rank_answers=rank)
    offered = seen[0].json_schema["properties"]["answer"]["items"]["enum"]
    assert len(offered) == ANSWER_CHOICES and offered[0].startswith("Sentence number 19 ")
    assert asked == ["What does a topic mean?"] == [template_as_question("What does <fi>a topic</fi> mean?")]


def test_ranked_extract_answers_are_the_best_sentences_for_the_filled_instruction(fake_engine):
    from fineinstructions_dagster.prompts import instantiate

    doc = ("Lists are mutable sequences of values in Python. The sort method sorts a list in place and returns "
           "None. Tuples cannot be changed once they are created at all. The sorted function returns a new list "
           "from any iterable input.")
    seen = []
    engine = fake_engine(lambda r: seen.append(r) or json.dumps({"fills": ["a list"]}))
    asked = []

    def rank(query: str, sentences: list[str]) -> list[str]:
        asked.append(query)
        return sorted(sentences, key=lambda s: -("sort" in s))  # the two about sorting first

    pending = pl.DataFrame({"match_id": ["m1"], "doc_id": "d1", "template_id": "t1", "shard": "s", "text": doc,
                            "template": "How do I sort <fi>a container</fi> in Python?"})
    kept, quarantined, _ = instantiate_matches(
        pending, LLMCall(engine, None, GenerationStats()), SamplingConfig(), 4000, 400, 800, prompt_format="extract",
        min_instruction_words=4, min_answer_words=8, rank_answers=rank, extract_answer="ranked",
        relevance=lambda q, a: [0.5] * len(q), relevance_model="m")
    assert set(seen[0].json_schema["properties"]) == {"fills"}  # the model fills the slots only
    assert asked == ["How do I sort a list in Python?"]  # ranked for the filled instruction
    assert kept["answer"].to_list() == ["The sort method sorts a list in place and returns None. The sorted "
                                        "function returns a new list from any iterable input."]  # document order
    assert kept["prompt_version"][0] == instantiate.EXTRACT_FILLS_PROMPT_VERSION and kept["relevance"][0] == 0.5
