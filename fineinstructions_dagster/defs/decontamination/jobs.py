"""`benchmarks_job`: read the benchmark files and store their n-grams."""

from dagster import define_asset_job

from fineinstructions_dagster.defs import steps

benchmarks_job = define_asset_job("benchmarks_job", selection=steps.BENCHMARK_STEP,
                                  description="Read the benchmark files and store their n-grams (benchmark_ngrams).")
