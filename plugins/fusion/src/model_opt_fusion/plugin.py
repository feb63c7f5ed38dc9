"""Hook implementations of the fusion plugin: conv_bn_relu and linear_gelu."""

from __future__ import annotations

from typing import Any

from model_opt.hookspecs import hookimpl
from model_opt.registry import Option, Recommended, Technique

CONV_BN_RELU = Technique(
    kind="fuse",
    backend="fusion",
    method="conv_bn_relu",
    summary="Fold BatchNorm into the preceding Conv (1d/2d/3d, grouped, depthwise) or Linear, and fuse the "
    "ReLU where it is not shared.",
    options=(
        Option("fold_activation", bool, True, "also fuse a ReLU that only this conv feeds"),
        Option("exclude", list, [], "module names (or prefixes) to leave untouched"),
    ),
    speeds_up=("cpu", "cuda"),
    search_space={},
    families=("cnn", "hybrid"),
    recommended=(Recommended("cnn", "folding BatchNorm removes a pass over every activation, exactly", rank=30),
                 Recommended("hybrid", "fold BatchNorm in the conv stem", rank=30)),
)
LINEAR_GELU = Technique(
    kind="fuse",
    backend="fusion",
    method="linear_gelu",
    summary="Replace Linear followed by GELU (timm Mlp fc1 -> act) by one module; a cuBLASLt GELU epilogue "
    "on CUDA.",
    options=(
        Option("allow_tanh", bool, False, "on CUDA, use the epilogue (tanh GELU) for exact-GELU layers too"),
        Option("exclude", list, [], "module names (or prefixes) to leave untouched"),
    ),
    speeds_up=("cuda",),
    search_space={},
    families=("vit", "hybrid", "transformer"),
    speed_note="on CPU the fused module computes the same ops (the addmm+GELU kernel was measured no faster); "
    "torch.compile fuses them",
)


@hookimpl
def register_techniques(register: Any) -> None:
    register(CONV_BN_RELU)
    register(LINEAR_GELU)


@hookimpl
def fuse(model: Any, technique: Technique, options: dict[str, Any], context: Any) -> Any:
    from model_opt.errors import TechniqueError

    if model.training:
        raise TechniqueError(
            "the model is in training mode, and folding layers is valid only for inference",
            "call model.eval() before fusing",
        )
    from .fuse import fuse_conv_bn, fuse_linear_gelu

    if technique.method == "conv_bn_relu":
        return fuse_conv_bn(model, fold_activation=options["fold_activation"], exclude=options["exclude"])
    return fuse_linear_gelu(model, allow_tanh=options["allow_tanh"], exclude=options["exclude"])


@hookimpl
def restore(model: Any, technique: Technique, options: dict[str, Any], state: dict[str, Any], context: Any) -> Any:
    """Fuse the recorded layer pairs again; the fused weights come from the artifact."""
    from .fuse import replay_conv_bn, replay_linear_gelu

    if technique.method == "conv_bn_relu":
        return replay_conv_bn(model, state)
    return replay_linear_gelu(model, state, options["allow_tanh"])
