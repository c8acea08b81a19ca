"""Dagster wiring of the dbt quality gates (dbt_quality/)."""
