"""Token merging for Stable Diffusion (ToMeSD), dispatched to the ``tomesd`` plugin."""

from __future__ import annotations

from typing import Any

from model_opt.techniques import _Technique


class StableDiffusionPruner(_Technique):
    """``StableDiffusionPruner().apply_patch(unet_or_pipe, ratio=0.5)``."""

    def apply_patch(self, model: Any, ratio: float = 0.5, **options: Any) -> Any:
        return self._run("prune", model, backend="tomesd", method="token_merging",
                         options={"ratio": ratio, **options})


__all__ = ["StableDiffusionPruner"]
