"""Dagster wiring for the pairs stage."""
