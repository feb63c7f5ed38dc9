"""Token merging (ToMe) for timm Vision Transformers, dispatched to the ``tome`` plugin."""

from __future__ import annotations

from typing import Any

from model_opt.techniques import _Technique, call_plugin_function


class ViTToMePruner(_Technique):
    """``ViTToMePruner().apply_patch(timm_vit, r=16)``: merge ``r`` tokens in every block."""

    def apply_patch(self, model: Any, r: int = 16, **options: Any) -> Any:
        return self._run("prune", model, backend="tome", method="token_merging", options={"r": r, **options})

    def remove_patch(self, model: Any) -> Any:
        """Undo apply_patch: the model computes exactly what it did before."""
        return call_plugin_function("prune", "tome", "token_merging", "remove_patch", model)


__all__ = ["ViTToMePruner"]
