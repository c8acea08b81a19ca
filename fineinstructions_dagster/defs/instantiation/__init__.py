"""Dagster wiring for the instantiation stage."""
