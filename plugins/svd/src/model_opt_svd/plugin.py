"""Hook implementations of the svd plugin: low-rank decomposition of Linear and Conv2d layers."""

from __future__ import annotations

from typing import Any

from model_opt.hookspecs import hookimpl
from model_opt.registry import Option, Recommended, Technique

_UNIT = {"minimum": 0.0, "maximum": 1.0, "exclusive_minimum": True}

SVD = Technique(
    kind="decompose",
    backend="svd",
    method="svd",
    summary="Replace Linear (and Conv2d) layers by two low-rank factors from a truncated SVD.",
    options=(
        Option("rank_ratio", float, 0.5, flag="--rank-ratio", help="rank as a fraction of min(in, out)", **_UNIT),
        Option("energy", float, None, "instead of rank_ratio: keep this fraction of the spectral energy", **_UNIT),
        Option("include", list, [], "only these module names (or prefixes); default all"),
        Option("exclude", list, [], "module names (or prefixes) to leave untouched"),
        Option("conv", bool, True, "also factorize Conv2d layers (k x k with r outputs, then 1 x 1)"),
        Option("min_features", int, 16, "skip layers with min(in, out) below this", minimum=1),
    ),
    speeds_up=("cpu", "cuda"),
    search_space={"rank_ratio": (0.25, 0.5)},
    families=("cnn", "vit", "hybrid", "transformer"),
    recommended=(
        Recommended("cnn", "low-rank factors for large layers", {"rank_ratio": 0.5}, rank=40),
        Recommended("vit", "SVD on the attention and MLP projections", {"rank_ratio": 0.5, "include": ["blocks"]},
                    rank=40),
        Recommended("transformer", "low-rank factors for wide Linear layers", {"rank_ratio": 0.5}, rank=40),
    ),
    speed_note="a layer speeds up only where the rank is well below the break-even point",
)


@hookimpl
def register_techniques(register: Any) -> None:
    register(SVD)


@hookimpl
def decompose(model: Any, technique: Technique, options: dict[str, Any], context: Any) -> Any:
    from .decompose import decompose_model

    return decompose_model(model, **options)


@hookimpl
def restore(model: Any, technique: Technique, options: dict[str, Any], state: dict[str, Any], context: Any) -> Any:
    """Replace each recorded layer by an (empty) low-rank pair of the recorded rank."""
    from .decompose import rebuild

    return rebuild(model, state["ranks"])
