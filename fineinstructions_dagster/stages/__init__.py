"""Plain stage logic, one module per stage of the FineInstructions method. No Dagster imports."""
