"""Find producer -> consumer module pairs (Conv -> BN, BN -> ReLU, Linear -> GELU) in the traced graph.

torch.fx traces the model, or, where that fails, the largest sub-modules that trace; the modules that
trace nowhere are reported so that callers can fall back to module order there (with a warning).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from model_opt.errors import describe
from torch import fx, nn


class _Tracer(fx.Tracer):
    """Keeps BatchNorm subclasses (timm's BatchNormAct2d) and activations as leaf modules."""

    def is_leaf_module(self, module: nn.Module, qualname: str) -> bool:
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            return True
        return super().is_leaf_module(module, qualname)


@dataclass
class Traced:
    """Module-call edges found by tracing, plus the regions that could not be traced."""

    edges: list[tuple[str, str]] = field(default_factory=list)  # (producer module, sole consumer module)
    calls: Counter = field(default_factory=Counter)  # how often each module is called
    untraced: list[tuple[str, str]] = field(default_factory=list)  # (module name, reason)


def trace(model: nn.Module) -> Traced:
    result = Traced()
    _trace_into(model, "", result)
    return result


def _trace_into(module: nn.Module, prefix: str, result: Traced) -> None:
    try:
        graph = _Tracer().trace(module)
    except Exception as exc:  # control flow, unsupported ops: try the children one by one
        result.untraced.append((prefix, describe(exc, 160)))
        for name, child in module.named_children():
            _trace_into(child, _join(prefix, name), result)
        return
    nodes = list(graph.nodes)
    for node in nodes:
        if node.op == "call_module":
            result.calls[_join(prefix, node.target)] += 1
    for node in nodes:
        if node.op != "call_module" or len(node.users) != 1:
            continue
        (user,) = node.users
        if user.op == "call_module" and user.args and user.args[0] is node:
            result.edges.append((_join(prefix, node.target), _join(prefix, user.target)))


def _join(prefix: str, target: str) -> str:
    return f"{prefix}.{target}" if prefix else str(target)


__all__ = ["Traced", "trace"]
