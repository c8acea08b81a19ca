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
