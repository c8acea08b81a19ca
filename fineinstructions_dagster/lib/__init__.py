"""Shared plain-Python helpers (no Dagster imports): ids, storage, statistics, input formats."""
