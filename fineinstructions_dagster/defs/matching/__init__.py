"""Dagster wiring for the matching stage."""
