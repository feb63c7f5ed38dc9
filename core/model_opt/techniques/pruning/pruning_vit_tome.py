"""Token merging (ToMe) for timm Vision Transformers, dispatched to the ``tome`` plugin."""

from __future__ import annotations

from typing import Any

from model_opt.techniques import _Technique


class ViTToMePruner(_Technique):
    """``ViTToMePruner().apply_patch(timm_vit, r=16)``: merge ``r`` tokens in every block."""

    def apply_patch(self, model: Any, r: int = 16, **options: Any) -> Any:
        return self._run("prune", model, backend="tome", method="token_merging", options={"r": r, **options})


__all__ = ["ViTToMePruner"]
