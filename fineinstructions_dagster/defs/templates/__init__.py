"""Dagster wiring for the templates stage."""
