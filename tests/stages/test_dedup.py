import random

import numpy as np
import polars as pl
import pytest

from fineinstructions_dagster.stages.dedup import (
    MinhashConfig,
    cluster_duplicates,
    minhash_signatures,
    shingle_hashes,
    signature_frame,
)

CFG = MinhashConfig()
random.seed(7)
VOCAB = [f"word{i}" for i in range(3000)]
BASE = [" ".join(random.choices(VOCAB, k=200)) for _ in range(40)]


def edit(text: str, rate: float, seed: int) -> str:
    rng = random.Random(seed)
    return " ".join(rng.choice(VOCAB) if rng.random() < rate else w for w in text.split())


def frame(texts: list[str], ids: list[str], shards: list[str]) -> pl.DataFrame:
    sig = signature_frame(ids, texts, CFG)
    return sig.with_columns(pl.Series("shard", shards),
                            pl.Series("text_hash", [" ".join(t.lower().split()) for t in texts]))


def test_signatures_are_stable_across_runs_and_case_insensitive():
    a = minhash_signatures(["The Quick brown fox jumps over the lazy dog"], CFG)
    b = minhash_signatures(["the quick  brown fox jumps over the lazy dog!"], CFG)
    assert a.shape == (1, 120) and (a == b).all()
    # pinned values: MD5-based hashing must not change under a library upgrade
    assert a[0, :3].tolist() == [1883739881, 285162274, 428648444]


def test_short_and_empty_documents():
    doc, h = shingle_hashes(["one two", "", "a b c d e f"], 5)
    assert doc.tolist() == [0, 2, 2]
    sig = minhash_signatures(["", "x"], CFG)
    assert (sig[0] == np.iinfo(np.uint32).max).all() and (sig[1] < np.iinfo(np.uint32).max).any()


def test_near_duplicates_found_unrelated_kept():
    texts = BASE + [edit(BASE[0], 0.01, 1), edit(BASE[1], 0.02, 2), BASE[2].upper()]
    ids = [f"d{i:03d}" for i in range(len(texts))]
    out = cluster_duplicates(frame(texts, ids, ["s"] * len(texts)), CFG)
    removed = out.filter(~pl.col("kept")).sort("doc_id")
    assert removed["doc_id"].to_list() == ["d040", "d041", "d042"]
    assert removed["duplicate_of"].to_list() == ["d000", "d001", "d002"]
    assert removed["reason"].to_list() == ["near_duplicate", "near_duplicate", "exact_duplicate"]
    assert out.filter(pl.col("kept")).height == 40


@pytest.mark.parametrize("order", ["a_first", "b_first"])
def test_cross_shard_duplicate_found_whichever_shard_comes_first(order):
    shard_a = frame(BASE[:10], [f"a{i}" for i in range(10)], ["a"] * 10)
    copy = edit(BASE[3], 0.01, 3)
    shard_b = frame([copy, BASE[20]], ["b0", "b1"], ["b", "b"])
    parts = [shard_a, shard_b] if order == "a_first" else [shard_b, shard_a]
    out = cluster_duplicates(pl.concat(parts), CFG)
    removed = out.filter(~pl.col("kept"))
    # the smaller doc_id is kept, whatever the order: "a3" < "b0"
    assert removed.select("doc_id", "duplicate_of", "shard").to_dicts() == [
        {"doc_id": "b0", "duplicate_of": "a3", "shard": "b"}]


def test_empty_input():
    assert cluster_duplicates(frame([], [], []), CFG).height == 0


def test_same_text_under_two_ids_is_an_exact_duplicate_and_a_repeated_id_is_refused():
    out = cluster_duplicates(frame([BASE[0], BASE[0], BASE[1]], ["d1", "d0", "d2"], ["s"] * 3), CFG)
    assert out.filter(~pl.col("kept")).select("doc_id", "duplicate_of", "reason").rows() == [
        ("d1", "d0", "exact_duplicate")]
    with pytest.raises(ValueError, match="1 doc_ids have more than one signature row .*d0 in shard s"):
        cluster_duplicates(frame([BASE[0], BASE[0]], ["d0", "d0"], ["s", "s"]), CFG)
