"""Walk a model and replace each eligible layer by its low-rank factors, skipping those that would not shrink."""

from __future__ import annotations

from typing import Any

from model_opt.modules import selected, set_module
from model_opt.result import TechniqueResult
from torch import nn

from .lowrank import (
    LowRankConv2d,
    LowRankLinear,
    choose_rank,
    factor_params,
    low_rank_conv,
    low_rank_linear,
    singular_values,
)


def decompose_model(model: nn.Module, rank_ratio: float | None = 0.5, energy: float | None = None,
                    include: list[str] = (), exclude: list[str] = (), conv: bool = True,
                    min_features: int = 16) -> tuple[nn.Module, dict[str, Any]]:
    from model_opt.errors import UsageError

    if rank_ratio is None and energy is None:
        raise UsageError("svd needs rank_ratio or energy", "pass rank_ratio=0.5 or energy=0.9")
    if energy is not None:
        rank_ratio = None
    targets = [(name, module) for name, module in model.named_modules()
               if (type(module) is nn.Linear or (conv and type(module) is nn.Conv2d and module.groups == 1))
               and selected(name, include, exclude)]
    replaced: dict[str, dict[str, int]] = {}
    skipped: dict[str, str] = {}
    before = after = 0
    for name, layer in targets:
        if isinstance(layer, nn.Linear):
            out_f, in_f = layer.out_features, layer.in_features
            weight2d = layer.weight
        else:
            out_f, in_f = layer.out_channels, layer.weight[0].numel()
            weight2d = layer.weight.reshape(out_f, -1)
        if min(out_f, in_f) < min_features:
            skipped[name] = f"min(in, out) = {min(out_f, in_f)} < min_features {min_features}"
            continue
        rank = choose_rank(singular_values(weight2d.detach()), rank_ratio, energy)
        full, factored = out_f * in_f, factor_params(out_f, in_f, rank)
        if factored >= full:
            break_even = out_f * in_f / (out_f + in_f) / min(out_f, in_f)
            skipped[name] = (f"rank {rank} of {min(out_f, in_f)} would not save parameters "
                             f"({factored} >= {full}; break-even rank ratio {break_even:.2f})")
            continue
        new = low_rank_linear(layer, rank) if isinstance(layer, nn.Linear) else low_rank_conv(layer, rank)
        set_module(model, name, new)
        replaced[name] = {"rank": rank, "full_rank": min(out_f, in_f), "params_before": full,
                          "params_after": factored}
        before += full
        after += factored
    info: dict[str, Any] = {
        "changed": bool(replaced),
        "replaced": len(replaced),
        "weight_params_before": before,
        "weight_params_after": after,
        "layers": replaced,
        "skipped": skipped,
    }
    if not replaced:
        info["note"] = "nothing to decompose: no Linear/Conv2d layer would get fewer parameters at this rank"
    return TechniqueResult(model, info, {"ranks": {name: layer["rank"] for name, layer in replaced.items()}})


def rebuild(model: nn.Module, ranks: dict[str, int]) -> nn.Module:
    """The factorized layers' structure on a fresh copy of the architecture (weights come from the artifact)."""
    for name, rank in ranks.items():
        layer = model.get_submodule(name)
        if type(layer) is nn.Linear:
            new = LowRankLinear(layer.in_features, layer.out_features, rank, bias=layer.bias is not None)
        elif type(layer) is nn.Conv2d:
            new = LowRankConv2d(layer, rank)
        else:
            raise ValueError(f"{name} is a {type(layer).__name__}, not the Linear/Conv2d that was factorized")
        set_module(model, name, new.to(layer.weight.device))
    return model
