"""model-opt plugin: Token merging for Stable Diffusion UNets (tomesd)."""
