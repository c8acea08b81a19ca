"""Dagster wiring, one folder per stage with the same file names (assets.py, sensors.py, ...).
The logic lives in `fineinstructions_dagster.stages`; assets here read, call one function, write."""
