"""Dagster wiring for the judging stage."""
