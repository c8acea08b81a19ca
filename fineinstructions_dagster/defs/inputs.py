"""Input discovery shared by the sensors, the assets and the command-line runner."""

from __future__ import annotations

import polars as pl

from fineinstructions_dagster.lib.formats import discover_sources, malformed_frame, read_texts


def query_sources(queries_dir: str) -> dict[str, list[str]]:
    return discover_sources(queries_dir, subfolders_are_sources=True)


def corpus_shards(corpus_dir: str) -> dict[str, list[str]]:
    return discover_sources(corpus_dir, subfolders_are_sources=False)


def read_partition_input(found: dict[str, list[str]], key: str, folder: str,
                         what: str) -> tuple[pl.DataFrame, pl.DataFrame]:
    """(normalised rows, malformed-line quarantine rows) for one partition's input files."""
    if key not in found:
        raise FileNotFoundError(f"{what} {key!r}: no input file for it in {folder} (was it moved or deleted?)")
    raw, report = read_texts(found[key])
    return raw, malformed_frame(report)


