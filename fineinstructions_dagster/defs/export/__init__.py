"""Dagster wiring of the pre-training export."""
