import random
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from fineinstructions_dagster.lib.ids import content_id
from fineinstructions_dagster.stages.dedup import (
    BUCKETS,
    EXACT_BAND,
    MinhashConfig,
    bucket_range,
    bucket_range_keys,
    candidate_edges,
    decide_duplicates,
    dedup_in_one_process,
    id_keys,
    key_ids,
    minhash_signatures,
    shard_signatures,
    shingle_hashes,
    signature_blobs,
    signature_matrix,
)

CFG = MinhashConfig()
random.seed(7)
VOCAB = [f"word{i}" for i in range(3000)]
BASE = [" ".join(random.choices(VOCAB, k=200)) for _ in range(40)]


def edit(text: str, rate: float, seed: int) -> str:
    rng = random.Random(seed)
    return " ".join(rng.choice(VOCAB) if rng.random() < rate else w for w in text.split())


def doc_id(name: str) -> str:
    return content_id("doc", name)


def write_shard(folder: Path, shard: str, texts: list[str], names: list[str]) -> tuple[list[Path], list[Path]]:
    """The filter step's part files for one shard: signatures and band rows."""
    folder.mkdir(parents=True, exist_ok=True)
    ids = pl.Series([doc_id(n) for n in names], dtype=pl.String)
    hashes = pl.Series([content_id("hash", " ".join(t.lower().split())) for t in texts], dtype=pl.String)
    sig, bands = shard_signatures(ids, hashes, texts, CFG)
    sig.write_parquet(folder / f"sig-{shard}.parquet")
    bands.write_parquet(folder / f"bands-{shard}.parquet")
    return [folder / f"sig-{shard}.parquet"], [folder / f"bands-{shard}.parquet"]


def dedup(tmp_path: Path, shards: dict[str, tuple[list[str], list[str]]], cfg: MinhashConfig = CFG,
          prior: pl.DataFrame | None = None, decided: frozenset[str] = frozenset()) -> pl.DataFrame:
    parts = {s: write_shard(tmp_path / "parts", s, texts, names) for s, (texts, names) in shards.items()}
    return dedup_in_one_process(parts, tmp_path / f"scratch-{len(list(tmp_path.iterdir()))}", cfg, prior, decided)


def removed_names(out: pl.DataFrame, names: list[str]) -> list[tuple[str, str, str]]:
    back = {doc_id(n): n for n in names}
    rows = out.filter(~pl.col("kept")).sort("doc_id")
    return sorted((back[d], back[k], r) for d, k, r in rows.select("doc_id", "duplicate_of", "reason").rows())


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


def test_ids_and_signatures_round_trip_as_compact_integers():
    ids = pl.Series([doc_id(str(i)) for i in range(50)] + ["d0000000000000000", "dffffffffffffffff"])
    keys = id_keys(ids)
    assert keys.dtype == np.uint64 and key_ids(keys).to_list() == ids.to_list()
    assert (np.argsort(keys) == np.argsort(ids.to_numpy())).all()  # same order as the strings
    with pytest.raises(ValueError, match="not a 64-bit content id"):
        id_keys(pl.Series(["doc-1"]))
    sig = minhash_signatures(BASE[:5], CFG)
    blobs = signature_blobs(sig)
    assert blobs.dtype == pl.Binary and (signature_matrix(blobs.slice(2), 120) == sig[2:]).all()
    with pytest.raises(ValueError, match="expected 60"):
        signature_matrix(blobs, 60)


def test_band_rows_one_per_band_plus_the_exact_band_sorted_by_bucket():
    _, bands = shard_signatures(pl.Series([doc_id("a"), doc_id("b")]), pl.Series([content_id("hash", "x")] * 2),
                                BASE[:2], CFG)
    assert bands.height == 2 * (CFG.bands + 1) and bands["bucket"].is_sorted()
    assert bands["bucket"].max() < BUCKETS and sorted(set(bands["band"])) == [*range(CFG.bands), EXACT_BAND]
    # the same text hash: the exact band rows share a key
    assert bands.filter(pl.col("band") == EXACT_BAND)["key"].n_unique() == 1
    assert [bucket_range(k) for k in ("00", "15")] == [(0, BUCKETS // 16), (BUCKETS - BUCKETS // 16, BUCKETS)]
    with pytest.raises(ValueError, match="bucket range '16'"):
        bucket_range("16")


def test_candidate_edges_are_the_same_whatever_the_chunk_size(tmp_path):
    texts = BASE[:20] + [edit(BASE[0], 0.01, 1), BASE[1]]
    _, (bands,) = write_shard(tmp_path, "s", texts, [str(i) for i in range(len(texts))])
    whole = pl.concat([candidate_edges([bands], *bucket_range(k), chunk_rows=10**9) for k in bucket_range_keys()])
    tiny = pl.concat([candidate_edges([bands], *bucket_range(k), chunk_rows=3) for k in bucket_range_keys()])
    assert whole.height > 0 and whole.sort("a", "b", "exact").equals(tiny.sort("a", "b", "exact"))


def test_near_duplicates_found_unrelated_kept(tmp_path):
    texts = BASE + [edit(BASE[0], 0.01, 1), edit(BASE[1], 0.02, 2), BASE[2].upper()]
    names = [f"{i:03d}" for i in range(len(texts))]
    out = dedup(tmp_path, {"s": (texts, names)})
    # which of two copies stays is the smaller doc_id's
    expected = []
    for copy, original, reason in (("040", "000", "near_duplicate"), ("041", "001", "near_duplicate"),
                                   ("042", "002", "exact_duplicate")):
        gone, kept = (copy, original) if doc_id(original) < doc_id(copy) else (original, copy)
        expected.append((gone, kept, reason))
    assert removed_names(out, names) == sorted(expected)
    assert out.filter(pl.col("reason") == "near_duplicate")["similarity"].min() > 0.8
    assert out.filter(pl.col("kept")).height == 3  # only documents in a cluster have a row


@pytest.mark.parametrize("order", ["a_first", "b_first"])
def test_cross_shard_duplicate_found_whichever_shard_comes_first(tmp_path, order):
    a = (BASE[:10], [f"a{i}" for i in range(10)])
    b = ([edit(BASE[3], 0.01, 3), BASE[20]], ["b0", "b1"])
    shards = {"a": a, "b": b} if order == "a_first" else {"b": b, "a": a}
    out = dedup(tmp_path, shards)
    gone = out.filter(~pl.col("kept"))
    assert gone.height == 1
    pair = sorted([("a", doc_id("a3")), ("b", doc_id("b0"))], key=lambda x: x[1])
    assert gone.select("shard", "doc_id", "duplicate_of_shard", "duplicate_of").row(0) == (
        pair[1][0], pair[1][1], pair[0][0], pair[0][1])


def test_stable_rule_keeps_earlier_decisions_and_removes_the_newcomer(tmp_path):
    """A new shard's copy of an old shard's document is removed even when its doc_id is smaller; `rebuild`
    decides from scratch (smallest doc_id wins)."""
    old = {"a": (BASE[:10], [f"a{i}" for i in range(10)]), "b": (BASE[10:20], [f"b{i}" for i in range(10)])}
    first = dedup(tmp_path, old)
    assert first.filter(~pl.col("kept")).height == 0
    # a name whose doc_id sorts before a0's, so `rebuild` would keep the newcomer
    newcomer = next(f"c{i}" for i in range(1000) if doc_id(f"c{i}") < doc_id("a0"))
    new = {**old, "c": ([BASE[0], edit(BASE[11], 0.01, 4), BASE[30]], [newcomer, "c-b1", "c-new"])}
    stable = dedup(tmp_path, new, prior=first.filter(~pl.col("kept")), decided=frozenset({"a", "b"}))
    gone = stable.filter(~pl.col("kept")).sort("doc_id")
    assert set(gone["shard"]) == {"c"} and sorted(gone["duplicate_of"]) == sorted([doc_id("a0"), doc_id("b1")])
    assert gone.filter(pl.col("doc_id") == doc_id(newcomer))["reason"].to_list() == ["exact_duplicate"]
    rebuilt = dedup(tmp_path, new, cfg=MinhashConfig(keep="rebuild"))
    assert doc_id("a0") in rebuilt.filter(~pl.col("kept"))["doc_id"].to_list()


def test_stable_rule_keeps_a_removed_document_removed_with_its_first_reason(tmp_path):
    old = {"a": ([BASE[0], edit(BASE[0], 0.01, 9)], ["x", "y"])}
    first = dedup(tmp_path, old)
    before = first.filter(~pl.col("kept"))
    assert before.height == 1
    again = dedup(tmp_path, {**old, "b": ([BASE[0]], ["z"])}, prior=before, decided=frozenset({"a"}))
    assert again.filter(pl.col("shard") == "a", ~pl.col("kept")).equals(before)
    assert again.filter(pl.col("shard") == "b")["kept"].to_list() == [False]


def test_empty_input(tmp_path):
    assert dedup(tmp_path, {"s": ([], [])}).height == 0
    assert decide_duplicates(pl.DataFrame(schema={"a": pl.UInt64, "b": pl.UInt64, "a_shard": pl.String,
                                                  "b_shard": pl.String, "similarity": pl.Float32,
                                                  "exact": pl.Boolean}), CFG).height == 0


def test_same_text_under_two_ids_is_an_exact_duplicate(tmp_path):
    out = dedup(tmp_path, {"s": ([BASE[0], BASE[0], BASE[1]], ["1", "0", "2"])})
    gone = out.filter(~pl.col("kept"))
    assert gone.height == 1 and gone["reason"].to_list() == ["exact_duplicate"]
    assert gone["duplicate_of"][0] == min(doc_id("0"), doc_id("1"))
