"""Hook implementations of the tome plugin: token merging for timm Vision Transformers."""

from __future__ import annotations

from typing import Any

from model_opt.hookspecs import hookimpl
from model_opt.registry import Option, Recommended, Technique
from model_opt.result import TechniqueResult

TOKEN_MERGING = Technique(
    kind="prune",
    backend="tome",
    method="token_merging",
    summary="Merge r similar tokens in every block of a timm ViT/DeiT (ToMe, bipartite soft matching).",
    options=(
        Option("r", int, 16, "tokens merged per block", minimum=0),
        Option("schedule", list, [], "one r per block instead of a constant r (e.g. 16,16,8,8,...)"),
        Option("prop_attn", bool, True, "proportional attention: add log(token size) to attention logits"),
    ),
    requires=("timm",),
    search_space={"r": (4, 8, 16)},
    families=("vit",),
    recommended=(Recommended("vit", "merging tokens in every block shortens the sequence each block runs on (ToMe); "
                             "measure the accuracy cost",
                             {"r": 16}, rank=20),),
    speeds_up=("cpu", "cuda"),
)


@hookimpl
def register_techniques(register: Any) -> None:
    register(TOKEN_MERGING)


@hookimpl
def prune(model: Any, technique: Technique, options: dict[str, Any], context: Any) -> Any:
    from model_opt.errors import TechniqueError, UsageError

    from .patch import apply_patch, check_patchable, schedule, token_count

    try:
        blocks = check_patchable(model)
    except ValueError as exc:
        raise TechniqueError(f"token merging cannot patch this model: {exc}",
                             "use a timm VisionTransformer or DeiT model") from None
    try:
        rs = schedule([int(v) for v in options["schedule"]] if options["schedule"] else options["r"], len(blocks))
    except ValueError as exc:
        raise UsageError(str(exc), "give one r per block, or a constant r") from None
    if any(r < 0 for r in rs):
        raise UsageError(f"r must not be negative (got {min(rs)})", "pass r >= 0")
    tokens = token_count(model)
    if sum(rs) > tokens - 2:
        largest = (tokens - 2) // len(blocks)
        raise UsageError(f"merging {sum(rs)} tokens would leave fewer than 2 of the {tokens} tokens",
                         f"the largest valid constant r for this model is {largest}")
    info = apply_patch(model, rs, prop_attn=options["prop_attn"])
    info["changed"] = sum(rs) > 0
    if not info["changed"]:
        info["note"] = "r=0 merges no token"
    return TechniqueResult(model, info, {"r": rs, "prop_attn": options["prop_attn"]})


@hookimpl
def restore(model: Any, technique: Technique, options: dict[str, Any], state: dict[str, Any], context: Any) -> Any:
    """Patch the fresh ViT with the recorded per-block r; token merging adds no weights."""
    from .patch import apply_patch

    apply_patch(model, [int(r) for r in state["r"]], prop_attn=bool(state["prop_attn"]))
    return model


def remove_patch(model: Any) -> Any:
    """Undo :func:`prune`: the model computes exactly what it did before the patch."""
    from .patch import remove_patch as remove

    return remove(model)
