"""Per-pair lineage in the web UI: a job that traces one pair and shows the chain."""
