"""Dagster wiring for the documents stage."""
