"""Detect a model's architecture family and recommend techniques for it.

The plan comes from the installed plugins' own declarations (``Technique.recommended``: family, why,
options, rank); the core names no backend."""

from __future__ import annotations

import copy
from dataclasses import replace
from typing import Any

from .hf import is_causal_lm
from .plugins import PluginManager, get_plugin_manager
from .registry import Recommended, install_hint


def detect_family(model: Any) -> tuple[str, str]:
    """(family, evidence) from the module structure."""
    from torch import nn

    config = getattr(model, "config", None)
    if callable(getattr(config, "to_dict", None)):
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
              manager: PluginManager | None = None) -> tuple[str, str, list[Recommended]]:
    """The family, the evidence, and the recommendations for it (the installed techniques' own, in rank order),
    each marked available or not (and why not) and slow here or not (and why): those fast on this device first,
    then those slow here, then those that cannot run here."""
    manager = manager or get_plugin_manager()
    family, evidence = detect_family(model)
    declared = sorted(((r.rank, t, r) for t in manager.registry.techniques.values() for r in t.recommended
                       if r.family == family), key=lambda x: (x[0], x[1].name))
    recommendations = []
    for _, technique, recommended in declared:
        missing = ""
        if technique.missing_packages():
            missing = f"missing {', '.join(technique.missing_packages())}: " \
                      f"{install_hint(technique.extra or technique.backend)}"
        elif "cuda" in technique.needs and not device.startswith("cuda"):
            missing = "needs a CUDA GPU"
        recommendations.append(replace(recommended, options=copy.deepcopy(recommended.options), technique=technique,
                                       available=not missing, missing=missing,
                                       slow=technique.slow_here(device, family) or ""))
    recommendations.sort(key=lambda r: (not r.available, bool(r.slow)))  # (stable: rank order within each)
    return family, evidence, recommendations


def first_fast_here(recommendations: list[Recommended], device: str = "cpu") -> Recommended | None:
    """The first recommendation that can run here, is not slow here, and speeds the model up on ``device`` (else the
    first that can run; None when none can)."""
    available = [r for r in recommendations if r.available and r.technique is not None]
    kind = device.split(":")[0]
    return next((r for r in available if not r.slow and kind in r.technique.speeds_up_on(r.options)),
                available[0] if available else None)


#: The runtime route recommend offers where the family's first technique is slow on this CPU (a core export format).
RUNTIME_FORMAT = "openvino"


def runtime_here(family: str, device: str = "cpu") -> str | None:
    """The runtime (:data:`RUNTIME_FORMAT`) that runs the float model of ``family`` on ``device`` without any
    technique, for when none pays: None on a GPU, for a causal LM (its routes are runtimes already) and where the
    runtime is not installed."""
    import importlib.util

    if device.startswith("cuda") or family == "causal-lm" or importlib.util.find_spec(RUNTIME_FORMAT) is None:
        return None
    return RUNTIME_FORMAT


def runtime_command(model: Any, runtime: str, test_dataset: Any, script_arg: str = "") -> str:
    """The command that converts the float model to ``runtime`` and measures it as a result is measured (the test
    script's metric; each model timed alone), writing the export and its report together."""
    return f"model-opt export {model} --format {runtime} --test-dataset {test_dataset}{script_arg} --report"


def runtime_instead(family: str, recommendations: list[Recommended], device: str = "cpu") -> str | None:
    """Why the float model in another runtime (:func:`runtime_here`) comes first: on a CPU where the family's first
    available technique is slow here (int8 kernels slower than float, say), the speed that is left is the
    runtime's. None where the first technique is fast here, or where :func:`runtime_here` has none."""
    available = [r for r in recommendations if r.available]
    runtime = runtime_here(family, device)
    if runtime is None or not available:
        return None
    first = min(available, key=lambda r: r.rank)
    if not first.slow:
        return None
    return (f"{first.technique.backend}:{first.technique.method}, the first choice for a {family}, is {first.slow}; "
            f"the float model in {runtime} (no technique, same outputs) is the route to time first here")
