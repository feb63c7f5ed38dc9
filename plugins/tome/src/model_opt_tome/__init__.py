"""model-opt plugin: Token merging (ToMe) for timm Vision Transformers."""
