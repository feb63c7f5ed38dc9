"""model-opt plugin: Intel Neural Compressor static int8, weight-only and autotune."""
