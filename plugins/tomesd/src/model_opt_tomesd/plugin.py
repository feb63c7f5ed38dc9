"""Hook implementations of the tomesd plugin: token merging for Stable Diffusion UNets (tomesd)."""

from __future__ import annotations

from typing import Any

from model_opt.hookspecs import hookimpl
from model_opt.registry import Option, Recommended, Technique

TOKEN_MERGING = Technique(
    kind="prune",
    backend="tomesd",
    method="token_merging",
    summary="Merge redundant tokens in a Stable Diffusion UNet's transformer blocks (tomesd).",
    options=(
        Option("ratio", float, 0.5, "fraction of tokens to merge", minimum=0.0, maximum=1.0,
               exclusive_maximum=True),
        Option("max_downsample", int, 1, "patch blocks with at most this downsampling", choices=(1, 2, 4, 8)),
        Option("sx", int, 2, "horizontal stride of the destination tokens", minimum=1),
        Option("sy", int, 2, "vertical stride of the destination tokens", minimum=1),
        Option("use_rand", bool, True, "random perturbation when choosing destination tokens"),
        Option("merge_attn", bool, True, "merge tokens for self-attention"),
        Option("merge_crossattn", bool, False, "merge tokens for cross-attention"),
        Option("merge_mlp", bool, False, "merge tokens for the MLP"),
    ),
    requires=("tomesd", "diffusers"),
    search_space={"ratio": (0.3, 0.5)},
    families=("diffusion",),
    recommended=(Recommended("diffusion", "ToMeSD merges redundant tokens in the high-resolution attention",
                             {"ratio": 0.5}, rank=20),),
    speeds_up=("cpu", "cuda"),
)


@hookimpl
def register_techniques(register: Any) -> None:
    register(TOKEN_MERGING)


def unet_of(model: Any) -> Any:
    """The UNet of a diffusers pipeline, or the UNet itself; refuse anything tomesd cannot patch."""
    from model_opt.errors import TechniqueError

    unet = getattr(model, "unet", None) if not hasattr(model, "down_blocks") else model
    unet = getattr(unet, "unet", unet)  # already wrapped by this plugin
    if unet is None:
        kind = type(getattr(model, "transformer", model)).__name__
        raise TechniqueError(
            f"tomesd patches the UNet of Stable Diffusion; {kind} is not one (DiT/PixArt transformers are not "
            "supported)", "pass a diffusers UNet2DConditionModel or a pipeline that has .unet")
    blocks = sum(type(m).__name__ == "BasicTransformerBlock" for m in unet.modules())
    if not blocks:
        raise TechniqueError(f"{type(unet).__name__} has no BasicTransformerBlock for tomesd to patch",
                             "use a UNet with attention blocks (Stable Diffusion 1.x/2.x/XL)")
    return unet


@hookimpl
def prune(model: Any, technique: Technique, options: dict[str, Any], context: Any) -> Any:
    return patch(model, options)


@hookimpl
def restore(model: Any, technique: Technique, options: dict[str, Any], state: dict[str, Any], context: Any) -> Any:
    """Patch the fresh UNet (or pipeline) with the recorded settings; tomesd adds no weights."""
    return patch(model, options).model


def patch(model: Any, options: dict[str, Any]) -> Any:
    """Apply tomesd; a bare UNet is wrapped so that it can be saved and reloaded patched."""
    import tomesd
    from model_opt.errors import UsageError
    from model_opt.result import TechniqueResult

    unet = unet_of(model)
    limit = 1 - 1 / (options["sx"] * options["sy"])
    if options["ratio"] > limit:
        raise UsageError(f"ratio {options['ratio']} is above {limit:.2f}, the most that sx={options['sx']}, "
                         f"sy={options['sy']} can merge", f"pass a ratio of at most {limit:.2f}")
    from .wrapper import TokenMergedUNet

    target = model.unet if isinstance(model, TokenMergedUNet) else model
    tomesd.apply_patch(target, **options)
    patched = sum(type(m).__name__.startswith("ToMeBlock") for m in unet.modules())
    info = {"changed": options["ratio"] > 0, "patched_blocks": patched, **options}
    if target is unet:  # a bare UNet: wrapped so that model-opt can save and reload it patched
        return TechniqueResult(TokenMergedUNet(unet, options), info)
    return TechniqueResult(target, info)


def remove_patch(model: Any) -> Any:
    """Undo the patch: the UNet computes exactly what it did before."""
    import tomesd

    from .wrapper import TokenMergedUNet

    if isinstance(model, TokenMergedUNet):
        tomesd.remove_patch(model.unet)
        return model.unet
    tomesd.remove_patch(model)
    return model
