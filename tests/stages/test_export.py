import json

import polars as pl
import pytest

from fineinstructions_dagster.lib.storage import TableStore
from fineinstructions_dagster.stages.export import (
    PackingConfig,
    chat_records,
    load_tokenizer,
    pack,
    tokenize_pairs,
)

PAIRS = pl.DataFrame({
    "pair_id": [f"p{i}" for i in range(6)],
    "instruction": ["How do I sort a list in Python?", "What does sorted() return?", "How are sockets closed?",
                    "What is a generator?", "Explain list comprehensions.", "x " * 400],
    "answer": ["Use list.sort() to sort in place, or sorted() for a new list.", "A new sorted list.",
               "Call close() on the socket, or use it in a with statement.",
               "A function that yields values lazily.", "A compact way to build lists from iterables.", "y"],
    "doc_id": "d", "template_id": "t", "judge_score": 5, "grounding": 0.9, "shard": "s",
})


@pytest.fixture(scope="module")
def tok(smoke_model):
    return load_tokenizer(str(smoke_model))


def test_chat_export_loads_with_datasets(tmp_path):
    datasets = pytest.importorskip("datasets")
    store = TableStore(tmp_path)
    chat = chat_records(PAIRS)
    parquet, jsonl = store.write("export_chat", chat, "s"), store.write_jsonl("export_chat", chat, "s")
    for ds in (datasets.load_dataset("parquet", data_files=str(parquet), split="train"),
               datasets.load_dataset("json", data_files=str(jsonl), split="train")):
        assert ds.num_rows == 6 and {"pair_id", "messages", "doc_id", "template_id"} <= set(ds.column_names)
        first = ds[0]["messages"]
        assert first == [{"role": "user", "content": PAIRS["instruction"][0]},
                         {"role": "assistant", "content": PAIRS["answer"][0]}]
    assert json.loads(jsonl.read_text().splitlines()[0])["messages"][1]["role"] == "assistant"


def test_packed_loss_mask_covers_exactly_the_answer_tokens(tok):
    cfg = PackingConfig(tokenizer="smoke", seq_len=128)
    tokens = tokenize_pairs(PAIRS, tok)
    packed, stats = pack(tokens, cfg.seq_len, tok.pad_token_id, "s")
    assert stats.dropped["longer_than_sequence"] == 1 and stats.kept == 5  # the 400-word one, counted not cut
    assert packed.height >= 1 and all(len(x) == 128 for x in packed["input_ids"].to_list())
    seen = []
    for row in packed.iter_rows(named=True):
        ids, mask, pos = row["input_ids"], row["loss_mask"], row["position_ids"]
        starts = [i for i, p in enumerate(pos) if p == 0 and row["attention_mask"][i] == 1]
        assert len(starts) == row["n_examples"]
        ends = starts[1:] + [sum(row["attention_mask"])]
        for pid, a, b in zip(row["pair_ids"], starts, ends, strict=True):
            answer_text = tok.decode([t for t, m in zip(ids[a:b], mask[a:b], strict=True) if m])
            prompt_text = tok.decode([t for t, m in zip(ids[a:b], mask[a:b], strict=True) if not m])
            ref = PAIRS.filter(pl.col("pair_id") == pid).row(0, named=True)
            assert ref["answer"] in answer_text and ref["instruction"] not in answer_text
            assert ref["instruction"] in prompt_text and ref["answer"] not in prompt_text
            # the masked span is one contiguous run at the end of the example
            m = mask[a:b]
            assert m == [0] * m.index(1) + [1] * (len(m) - m.index(1))
            seen.append(pid)
        pad = [i for i, a in enumerate(row["attention_mask"]) if a == 0]
        assert all(mask[i] == 0 and ids[i] == tok.pad_token_id for i in pad)
        assert row["answer_tokens"] == sum(mask)
    assert seen == [f"p{i}" for i in range(5)]  # pair_id order, each once


def test_packing_fills_sequences_greedily_and_is_deterministic(tok):
    tokens = tokenize_pairs(PAIRS.head(5), tok)
    a, _ = pack(tokens, 4096, tok.pad_token_id, "s")
    b, _ = pack(tokenize_pairs(PAIRS.head(5).reverse(), tok), 4096, tok.pad_token_id, "s")
    assert a.height == 1 and a["n_examples"].item() == 5 and a.equals(b)
    with pytest.raises(ValueError):
        PackingConfig(tokenizer="x", seq_len=4)


def test_empty_shard_exports_empty_tables(tok):
    packed, stats = pack(tokenize_pairs(PAIRS.clear(), tok), 64, 0, "s")
    assert packed.height == 0 and stats.total == 0 and chat_records(PAIRS.clear()).height == 0
