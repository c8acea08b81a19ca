"""`benchmark_ngrams`: the n-grams of every benchmark item decontamination checks against (the files in
FINEINSTRUCTIONS_BENCHMARKS and the builtin HumanEval), and the index the decontaminating steps load from it.

It depends on `decontamination_settings`, whose data version is a hash of the n and of every benchmark file's
version, and the decontaminating steps (user_queries, templates, the filter step, fineinstructions) depend on it:
a benchmark file added, replaced or removed makes exactly those stale. `benchmark_sensor` materializes it when it
is missing or was built for other files, and the input sensors hold new sources and shards back until then, so no
step ever runs against benchmarks other than those in force; one that would (a step launched by hand) fails,
naming what to materialize first."""

from pathlib import Path

import polars as pl
from dagster import (
    AssetExecutionContext,
    MaterializeResult,
    MetadataValue,
    asset,
)

from fineinstructions_dagster.defs.inputs import benchmark_sources
from fineinstructions_dagster.defs.resources import InputsResource, PipelineResource, StorageResource
from fineinstructions_dagster.defs.settings import DECONTAMINATION_SETTINGS
from fineinstructions_dagster.lib.formats import local_input
from fineinstructions_dagster.lib.storage import TableStore
from fineinstructions_dagster.lib.versions import code_version
from fineinstructions_dagster.stages import decontamination as stage
from fineinstructions_dagster.stages.decontamination import BenchmarkIndex, build_benchmark_ngrams, read_benchmark

BENCHMARK_NGRAMS = "benchmark_ngrams"
VERSION_KEY = "benchmarks_version"  # in the table's Parquet key-value metadata: what it was built for
CODE_VERSION = code_version(stage)


def benchmarks_version(pipeline: PipelineResource, inputs: InputsResource) -> str:
    """The data version `decontamination_settings` has now: what a stored index must have been built for."""
    return DECONTAMINATION_SETTINGS.version({"pipeline": pipeline, "inputs": inputs})


def benchmark_texts(pipeline: PipelineResource, inputs: InputsResource) -> tuple[pl.DataFrame, dict[str, dict], list]:
    """(every benchmark's texts: benchmark, item_id, field, text; per benchmark its files, items and texts; the
    files of the folder that are no benchmark's)."""
    cfg = pipeline.config().decontamination
    found, skipped = benchmark_sources(inputs.benchmarks(), cfg.builtin)
    frames, counts = [], {}
    for name, files in found.items():
        texts, n = read_benchmark(name, [(f, Path(local_input(f)).read_bytes()) for f in files])
        frames.append(texts)
        counts[name] = {"files": len(files), **n}
    empty = pl.DataFrame(schema={"benchmark": pl.String, "item_id": pl.String, "field": pl.String, "text": pl.String})
    return pl.concat([empty, *frames]), counts, skipped


def stored_benchmarks_version(store: TableStore) -> str | None:
    """The benchmark files' version `benchmark_ngrams` was built for; None before its first materialization."""
    if not store.exists(BENCHMARK_NGRAMS):
        return None
    return pl.read_parquet_metadata(store.file(BENCHMARK_NGRAMS)).get(VERSION_KEY)


def load_index(store: TableStore, pipeline: PipelineResource, inputs: InputsResource) -> tuple[BenchmarkIndex, dict]:
    """The index of `benchmark_ngrams`, which must have been built for the benchmark files in force (else a pair
    could be checked against benchmarks other than the configured ones). Returns (index, metadata: the version)."""
    version = benchmarks_version(pipeline, inputs)
    stored = stored_benchmarks_version(store)
    if stored != version:
        state = "is not materialized yet" if stored is None else "was built for other benchmark files or settings"
        raise RuntimeError(f"{BENCHMARK_NGRAMS} {state} (benchmarks version {version} is in force): materialize "
                           f"{BENCHMARK_NGRAMS} first (benchmarks_job; benchmark_sensor does it by itself)")
    n = pipeline.config().decontamination.ngram
    return BenchmarkIndex.build(pl.scan_parquet(store.file(BENCHMARK_NGRAMS)), n), {VERSION_KEY: version}


# No automation condition: benchmark_sensor requests it (also with automation off), once per benchmarks version.
@asset(group_name="decontamination", deps=[DECONTAMINATION_SETTINGS.key], code_version=CODE_VERSION,
       kinds={"polars", "parquet"})
def benchmark_ngrams(context: AssetExecutionContext, storage: StorageResource, pipeline: PipelineResource,
                     inputs: InputsResource) -> MaterializeResult:
    """The normalised word n-grams (13 words by default) of every benchmark item's text fields (question, prompt,
    answer, solution, ... found by name), with the benchmark, item id and the n-gram's text; texts shorter than n
    words, which no n-gram can find, go to quarantine (`shorter_than_ngram`). Also read by the dbt test that no
    exported pair overlaps a benchmark."""
    cfg = pipeline.config().decontamination
    # the version before the files are read: a file replaced meanwhile leaves it older than the files, so the
    # sensor builds again, never the other way round
    version = benchmarks_version(pipeline, inputs)
    texts, counts, skipped = benchmark_texts(pipeline, inputs)
    for s in skipped:
        context.log.warning(f"benchmark folder: not read: {s.path}: {s.reason}")
    ngrams, short = build_benchmark_ngrams(texts, cfg.ngram)
    store = storage.store()
    with store.publish(BENCHMARK_NGRAMS) as tmp:  # the version inside the file: the two cannot disagree
        ngrams.write_parquet(tmp, compression="zstd", statistics=True, metadata={VERSION_KEY: version})
    store.write(BENCHMARK_NGRAMS, short.with_columns(pl.lit("shorter_than_ngram").alias("reason")), quarantine=True)
    per_benchmark = ngrams.group_by("benchmark").len().sort("benchmark")
    for name, n in per_benchmark.iter_rows():
        counts[name]["ngrams"] = int(n)
    return MaterializeResult(metadata={
        "benchmarks": MetadataValue.json(counts), "ngram": cfg.ngram, "ngrams": ngrams.height,
        "items": sum(c["items"] for c in counts.values()), "texts_shorter_than_ngram": short.height,
        "skipped_benchmark_files": len(skipped), VERSION_KEY: version,
        "dagster/row_count": ngrams.height})

