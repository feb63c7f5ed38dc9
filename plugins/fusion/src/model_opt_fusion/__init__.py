"""model-opt plugin: Conv-BN-ReLU folding and Linear-GELU fusion."""
