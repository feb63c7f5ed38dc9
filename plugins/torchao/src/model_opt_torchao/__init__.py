"""model-opt plugin: TorchAO quantization (int8 weight-only, int8 dynamic, autoquant)."""
