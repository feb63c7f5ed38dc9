"""Pattern matching and module replacement for the fusion techniques."""

from __future__ import annotations

from typing import Any

import torch.ao.nn.intrinsic as nni
from model_opt.modules import excluded, set_module
from model_opt.result import TechniqueResult
from torch import nn

from .folding import LinearGELU, after_bn, fold_bn
from .graph import Traced, trace

CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
CONV_RELU = {nn.Conv1d: nni.ConvReLU1d, nn.Conv2d: nni.ConvReLU2d, nn.Conv3d: nni.ConvReLU3d}
BN_FOR = {nn.Conv1d: nn.BatchNorm1d, nn.Conv2d: nn.BatchNorm2d, nn.Conv3d: nn.BatchNorm3d,
          nn.Linear: nn.BatchNorm1d}


def _width(layer: nn.Module) -> int:
    return layer.out_features if isinstance(layer, nn.Linear) else layer.out_channels


def _foldable(layer: nn.Module, bn: nn.Module) -> bool:
    if type(layer) not in BN_FOR or not isinstance(bn, nn.modules.batchnorm._BatchNorm):
        return False
    if not isinstance(bn, BN_FOR[type(layer)]) or bn.num_features != _width(layer):
        return False
    return bn.track_running_stats and bn.running_mean is not None


def _sibling_pairs(model: nn.Module, traced: Traced) -> list[tuple[str, str, str]]:
    """Adjacent (producer, consumer) children of modules that could not be traced, with the reason."""
    pairs = []
    for name, reason in traced.untraced:
        parent = model.get_submodule(name) if name else model
        children = list(parent.named_children())
        for (a, _), (b, _) in zip(children, children[1:], strict=False):
            pairs.append((f"{name}.{a}" if name else a, f"{name}.{b}" if name else b, reason))
    return pairs


def fuse_conv_bn(model: nn.Module, fold_activation: bool = True, exclude: list[str] = ()) -> tuple[nn.Module, dict]:
    traced = trace(model)
    modules = dict(model.named_modules())
    consumers = dict(traced.edges)
    folded, activations, by_order, skipped = [], [], [], []
    pairs: list[list[str]] = []  # [conv, bn] folded, in order: the replay state
    relu_pairs: list[list[str]] = []  # [conv, relu] fused

    def fold(conv_name: str, bn_name: str) -> nn.Module:
        new = fold_pair(model, modules, conv_name, bn_name)
        folded.append(conv_name)
        pairs.append([conv_name, bn_name])
        return new

    for producer, consumer in traced.edges:
        layer, bn = modules.get(producer), modules.get(consumer)
        if not _foldable(layer, bn) or excluded(producer, exclude) or excluded(consumer, exclude):
            continue
        if traced.calls[producer] != 1 or traced.calls[consumer] != 1:
            skipped.append(f"{producer} -> {consumer}: module called more than once")
            continue
        new = fold(producer, consumer)
        act_name = consumers.get(consumer)
        act = modules.get(act_name) if act_name else None
        if not fold_activation or type(act) is not nn.ReLU or type(new) not in CONV_RELU or after_bn(bn).__class__ \
                is not nn.Identity:
            continue
        if traced.calls[act_name] != 1:
            skipped.append(f"{act_name}: ReLU shared with another path (e.g. after a residual add), kept apart")
            continue
        fuse_relu(model, new, producer, act_name)
        activations.append(act_name)
        relu_pairs.append([producer, act_name])
    for producer, consumer, reason in _sibling_pairs(model, traced):
        layer, bn = modules.get(producer), modules.get(consumer)
        if producer in folded or not _foldable(layer, bn) or excluded(producer, exclude):
            continue
        fold(producer, consumer)
        by_order.append(f"{producer} -> {consumer} (could not trace {producer.rpartition('.')[0] or 'model'}: "
                        f"{reason})")
    info: dict[str, Any] = {
        "changed": bool(folded),
        "folded_batchnorms": len(folded),
        "fused_activations": len(activations),
        "layers": folded,
        "skipped": skipped,
    }
    if by_order:
        info["folded_by_module_order"] = by_order
        info["warning"] = (f"{len(by_order)} BatchNorm(s) were paired by module order, not by the traced graph; "
                           "check the outputs")
    if not folded:
        info["note"] = "nothing to fuse: no BatchNorm directly follows a Conv or Linear"
    return TechniqueResult(model, info, {"folded": pairs, "relu": relu_pairs})


def fold_pair(model: nn.Module, modules: dict[str, nn.Module], conv_name: str, bn_name: str) -> nn.Module:
    new = fold_bn(modules[conv_name], modules[bn_name])
    set_module(model, conv_name, new)
    set_module(model, bn_name, after_bn(modules[bn_name]))
    return new


def fuse_relu(model: nn.Module, conv: nn.Module, conv_name: str, act_name: str) -> None:
    set_module(model, conv_name, CONV_RELU[type(conv)](conv, nn.ReLU()))
    set_module(model, act_name, nn.Identity())


def replay_conv_bn(model: nn.Module, state: dict[str, Any]) -> nn.Module:
    """Fold the recorded pairs again on a fresh copy of the architecture (weights come from the artifact)."""
    modules = dict(model.named_modules())
    folded = {conv: fold_pair(model, modules, conv, bn) for conv, bn in state["folded"]}
    for conv, act in state["relu"]:
        fuse_relu(model, folded[conv], conv, act)
    return model


def fuse_linear_gelu(model: nn.Module, allow_tanh: bool = False, exclude: list[str] = ()) -> tuple[nn.Module, dict]:
    traced = trace(model)
    modules = dict(model.named_modules())
    fused, by_order = [], []

    pairs: list[list[str]] = []

    def replace(linear_name: str, gelu_name: str) -> None:
        fuse_gelu_pair(model, modules, linear_name, gelu_name, allow_tanh)
        fused.append(linear_name)
        pairs.append([linear_name, gelu_name])

    def match(a: str, b: str) -> bool:
        return (type(modules.get(a)) is nn.Linear and type(modules.get(b)) is nn.GELU
                and not excluded(a, exclude) and a not in fused)

    for producer, consumer in traced.edges:
        if match(producer, consumer) and traced.calls[producer] == 1 and traced.calls[consumer] == 1:
            replace(producer, consumer)
    for producer, consumer, reason in _sibling_pairs(model, traced):
        if match(producer, consumer):
            replace(producer, consumer)
            by_order.append(f"{producer} -> {consumer} ({reason})")
    info: dict[str, Any] = {"changed": bool(fused), "fused": len(fused), "layers": fused}
    if by_order:
        info["fused_by_module_order"] = by_order
    if not fused:
        info["note"] = "nothing to fuse: no GELU directly follows a Linear"
    return TechniqueResult(model, info, {"fused": pairs})


def fuse_gelu_pair(model: nn.Module, modules: dict[str, nn.Module], linear_name: str, gelu_name: str,
                   allow_tanh: bool) -> None:
    gelu = modules[gelu_name]
    set_module(model, linear_name, LinearGELU(modules[linear_name], gelu.approximate, allow_tanh))
    set_module(model, gelu_name, nn.Identity())


def replay_linear_gelu(model: nn.Module, state: dict[str, Any], allow_tanh: bool) -> nn.Module:
    modules = dict(model.named_modules())
    for linear, gelu in state["fused"]:
        fuse_gelu_pair(model, modules, linear, gelu, allow_tanh)
    return model
