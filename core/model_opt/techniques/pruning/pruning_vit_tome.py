"""Token merging (ToMe) for Vision Transformers: the installed technique whose method is ``token_merging`` for
``vit`` models."""

from __future__ import annotations

from typing import Any

from model_opt.techniques import _Technique, call_plugin_function, for_family


class ViTToMePruner(_Technique):
    """``ViTToMePruner().apply_patch(timm_vit, r=16)``: merge ``r`` tokens in every block."""

    family = "vit"

    def apply_patch(self, model: Any, r: int = 16, **options: Any) -> Any:
        technique = for_family("prune", "token_merging", self.family)
        return self._run("prune", model, backend=technique.backend, method=technique.method,
                         options={"r": r, **options})

    def remove_patch(self, model: Any) -> Any:
        """Undo apply_patch: the model computes exactly what it did before."""
        return call_plugin_function(for_family("prune", "token_merging", self.family), "remove_patch", model)


__all__ = ["ViTToMePruner"]
