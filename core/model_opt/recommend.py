"""Detect a model's architecture family and recommend techniques for it.

The plan comes from the installed plugins' own declarations (``Technique.recommended``: family, why,
options, rank); the core names no backend."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .plugins import PluginManager, get_plugin_manager
from .registry import install_hint


@dataclass
class Recommendation:
    kind: str
    backend: str
    method: str
    options: dict[str, Any] = field(default_factory=dict)
    why: str = ""
    available: bool = True
    missing: str = ""


def detect_family(model: Any) -> tuple[str, str]:
    """(family, evidence) from the module structure."""
    from torch import nn

    config = getattr(model, "config", None)
    if callable(getattr(config, "to_dict", None)):
        from .modelio import is_causal_lm

        # a model built from a config in Python has no architectures in it: its class names it then
        values = {**config.to_dict()}
        values["architectures"] = values.get("architectures") or [type(model).__name__]
        if is_causal_lm(values):
            layers = values.get("num_hidden_layers", values.get("n_layer", "?"))
            return "causal-lm", (f"{values['architectures'][0]}, {layers} decoder "
                                 f"layers, vocabulary {values.get('vocab_size', '?')}")
    modules = list(model.modules())
    kinds = [type(m).__name__ for m in modules]
    convs = sum(isinstance(m, nn.modules.conv._ConvNd) for m in modules)
    linears = sum(isinstance(m, nn.Linear) for m in modules)
    attention = sum(isinstance(m, nn.MultiheadAttention) or "Attention" in type(m).__name__
                    or isinstance(getattr(m, "qkv", None), nn.Linear) for m in modules)
    patch_embed = any("PatchEmbed" in k for k in kinds)
    if "UNet" in type(model).__name__ or "BasicTransformerBlock" in kinds:
        return "diffusion", f"{type(model).__name__} with {kinds.count('BasicTransformerBlock')} transformer blocks"
    if attention and patch_embed and convs <= 1:
        return "vit", f"patch embedding and {attention} attention modules"
    if attention and convs > 1:
        return "hybrid", f"{convs} convolutions and {attention} attention modules"
    if convs:
        return "cnn", f"{convs} convolutions, no attention"
    return "transformer", f"{linears} Linear layers" + (f" and {attention} attention modules" if attention else "")


def recommend(model: Any, device: str = "cpu",
              manager: PluginManager | None = None) -> tuple[str, str, list[Recommendation]]:
    """The family, the evidence, and the plan with each line marked available or not (and why not)."""
    import copy

    manager = manager or get_plugin_manager()
    family, evidence = detect_family(model)
    declared = sorted(((r.rank, t, r) for t in manager.registry.techniques.values() for r in t.recommended
                       if r.family == family), key=lambda x: (x[0], x[1].name))
    plan = []
    for _, technique, recommended in declared:
        item = Recommendation(technique.kind, technique.backend, technique.method,
                              copy.deepcopy(recommended.options), recommended.why)
        if technique.missing_packages():
            item.available, item.missing = False, f"missing {', '.join(technique.missing_packages())}: " \
                f"{install_hint(technique.extra or item.backend)}"
        elif "cuda" in technique.needs and not device.startswith("cuda"):
            item.available, item.missing = False, "needs a CUDA GPU"
        plan.append(item)
    return family, evidence, plan
