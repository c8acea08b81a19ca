"""Dagster wiring for benchmark decontamination."""
