"""Examples that ship with model-opt (data included, no downloads)."""
