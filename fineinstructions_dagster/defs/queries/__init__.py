"""Dagster wiring for the queries stage."""
