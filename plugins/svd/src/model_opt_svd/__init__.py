"""model-opt plugin: Low-rank SVD decomposition of Linear and Conv layers."""
