"""FineInstructions on Dagster: synthetic instruction/answer pairs from pre-training corpora."""

__version__ = "0.1.0"
