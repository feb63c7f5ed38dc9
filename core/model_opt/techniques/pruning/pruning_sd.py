"""Token merging for Stable Diffusion: the installed technique whose method is ``token_merging`` for
``diffusion`` models."""

from __future__ import annotations

from typing import Any

from model_opt.techniques import _Technique, call_plugin_function, for_family


class StableDiffusionPruner(_Technique):
    """``StableDiffusionPruner().apply_patch(unet_or_pipe, ratio=0.5)``."""

    family = "diffusion"

    def apply_patch(self, model: Any, ratio: float = 0.5, **options: Any) -> Any:
        technique = for_family("prune", "token_merging", self.family)
        return self._run("prune", model, backend=technique.backend, method=technique.method,
                         options={"ratio": ratio, **options})

    def remove_patch(self, model: Any) -> Any:
        """Undo apply_patch: the UNet computes exactly what it did before."""
        return call_plugin_function(for_family("prune", "token_merging", self.family), "remove_patch", model)


__all__ = ["StableDiffusionPruner"]
