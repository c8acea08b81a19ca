import gzip
import json
import sqlite3

import pytest

from fineinstructions_dagster.cli import main
from fineinstructions_dagster.llm.cache import GenerationCache, GenerationStats, generate_cached
from fineinstructions_dagster.llm.engines import GenerationRequest, SamplingConfig


def reqs(n, temperature=0.0):
    return [GenerationRequest((("user", f"q{i}"),), SamplingConfig(temperature=temperature), seed=i)
            for i in range(n)]


def test_rerun_sends_zero_repeated_requests(tmp_path, fake_engine):
    engine = fake_engine(lambda r: "out " + r.messages[0][1])
    cache = GenerationCache(tmp_path / "c.sqlite")
    first = generate_cached(engine, reqs(5), "v1", cache)
    assert engine.requests == 5
    stats = GenerationStats()
    again = generate_cached(engine, reqs(5), "v1", GenerationCache(tmp_path / "c.sqlite"), stats)
    assert engine.requests == 5 and stats.cache_hits == 5 and stats.engine_requests == 0
    assert [r.text for r in again] == [r.text for r in first] and all(r.cached for r in again)


def test_key_covers_prompt_version_and_sampling(tmp_path, fake_engine):
    engine = fake_engine(lambda r: "x")
    cache = GenerationCache(tmp_path / "c.sqlite")
    generate_cached(engine, reqs(2), "v1", cache)
    generate_cached(engine, reqs(2), "v2", cache)
    generate_cached(engine, reqs(2, temperature=0.7), "v1", cache)
    assert engine.requests == 6


def test_duplicate_requests_in_one_batch_are_sent_once_and_failures_not_cached(tmp_path, fake_engine):
    engine = fake_engine(lambda r: "x")
    cache = GenerationCache(tmp_path / "c.sqlite")
    out = generate_cached(engine, reqs(1) * 3, "v1", cache)
    assert engine.requests == 1 and len(out) == 3

    class Failing:
        info = engine.info
        calls = 0

        def generate(self, rs):
            from fineinstructions_dagster.llm.engines import GenerationResult

            self.calls += len(rs)
            return [GenerationResult(text="", prompt="p", error="timeout") for _ in rs]

    failing = Failing()
    generate_cached(failing, reqs(3)[2:], "v9", cache)
    generate_cached(failing, reqs(3)[2:], "v9", cache)
    assert failing.calls == 2  # a failed request is retried next time, not served from cache


def test_fully_cached_partition_never_starts_the_engine(tmp_path, fake_engine):
    from fineinstructions_dagster.llm.engines import LazyEngine

    lazy = LazyEngine("transformers", str(tmp_path / "no-such-model"), "r1", {})
    cache = GenerationCache(tmp_path / "c.sqlite")
    # fill the cache under the same identity with a stand-in engine
    stand_in = fake_engine(lambda r: "cached text")
    stand_in.info = lazy.info
    generate_cached(stand_in, reqs(3), "v1", cache)
    out = generate_cached(lazy, reqs(3), "v1", cache)
    assert [r.text for r in out] == ["cached text"] * 3
    assert not lazy.loaded  # loading would have failed: the model folder does not exist


def test_an_imported_cache_reproduces_another_run_s_outputs_and_an_export_filters_by_model_and_prompt(
        tmp_path, fake_engine):
    first = fake_engine(lambda r: "first run " + r.messages[0][1])
    theirs = GenerationCache(tmp_path / "a" / "_cache" / "generations.sqlite")
    made = generate_cached(first, reqs(4), "v1", theirs)
    generate_cached(first, reqs(2), "v2", theirs)
    assert theirs.export(tmp_path / "v1.jsonl.gz", prompt_version="v1") == 4
    assert theirs.export(tmp_path / "none.jsonl", model="no-such-model") == 0
    rows = [json.loads(line) for line in gzip.open(tmp_path / "v1.jsonl.gz", "rt")]
    assert {r["prompt_version"] for r in rows} == {"v1"} and {r["model"] for r in rows} == {first.info.model}
    theirs.close()

    # another root whose engine would decode differently, already holding one different result for a key
    second = fake_engine(lambda r: "second run " + r.messages[0][1])
    ours = GenerationCache(tmp_path / "b" / "_cache" / "generations.sqlite")
    generate_cached(second, reqs(1), "v1", ours)
    assert ours.import_entries(tmp_path / "v1.jsonl.gz") == {"added": 3, "replaced": 1, "unchanged": 0}
    again = generate_cached(second, reqs(4), "v1", ours)
    assert second.requests == 1 and [r.text for r in again] == [r.text for r in made]
    assert ours.import_entries(tmp_path / "v1.jsonl.gz")["unchanged"] == 4
    ours.close()

    # a malformed file is refused naming its line, before anything is written
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(rows[0]) + "\n{\"key\": \"k\"}\n")
    with pytest.raises(ValueError, match=r"bad.jsonl: line 2 is not a generation cache entry"):
        GenerationCache(tmp_path / "c.sqlite").import_entries(bad)
    assert sqlite3.connect(tmp_path / "c.sqlite").execute("SELECT count(*) FROM generations").fetchone() == (0,)

    # the command works on a root's cache
    assert main(["--root", str(tmp_path / "b"), "cache", "export", str(tmp_path / "all.jsonl")]) == 0
    assert len((tmp_path / "all.jsonl").read_text().splitlines()) == 4
    assert main(["--root", str(tmp_path / "d"), "cache", "import", str(bad)]) == 2


def test_a_cache_written_before_entries_were_labelled_still_reads_and_gains_the_labels(tmp_path, fake_engine):
    old = sqlite3.connect(tmp_path / "c.sqlite")
    old.execute("CREATE TABLE generations (key TEXT PRIMARY KEY, result TEXT NOT NULL)")
    old.commit()
    old.close()
    engine = fake_engine(lambda r: "x")
    cache = GenerationCache(tmp_path / "c.sqlite")
    generate_cached(engine, reqs(2), "v1", cache)
    assert generate_cached(engine, reqs(2), "v1", cache)[0].cached
    assert cache.export(tmp_path / "out.jsonl", prompt_version="v1") == 2
