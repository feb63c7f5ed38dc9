"""Token merging for Stable Diffusion (ToMeSD), dispatched to the ``tomesd`` plugin."""

from __future__ import annotations

from typing import Any

from model_opt.techniques import _Technique, call_plugin_function


class StableDiffusionPruner(_Technique):
    """``StableDiffusionPruner().apply_patch(unet_or_pipe, ratio=0.5)``."""

    def apply_patch(self, model: Any, ratio: float = 0.5, **options: Any) -> Any:
        return self._run("prune", model, backend="tomesd", method="token_merging",
                         options={"ratio": ratio, **options})

    def remove_patch(self, model: Any) -> Any:
        """Undo apply_patch: the UNet computes exactly what it did before."""
        return call_plugin_function("prune", "tomesd", "token_merging", "remove_patch", model)


__all__ = ["StableDiffusionPruner"]
