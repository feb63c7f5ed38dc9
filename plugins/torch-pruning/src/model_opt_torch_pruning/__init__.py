"""model-opt plugin: Structured pruning of channels and heads with torch-pruning."""
