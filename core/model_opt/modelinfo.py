"""Facts about a model that several techniques need: its classifier head, where an input fails."""

from __future__ import annotations

from typing import Any

from .errors import UsageError, first_line
from .measure import call_model


def describe_input(value: Any) -> str:
    shape = getattr(value, "shape", None)
    if shape is not None:
        return str(tuple(shape))
    if isinstance(value, (tuple, list)):
        return "(" + ", ".join(describe_input(v) for v in value) + ")"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {describe_input(v)}" for k, v in value.items()) + "}"
    return type(value).__name__


def run_checked(model: Any, example: Any, what: str = "the example input") -> Any:
    """Run ``model`` on ``example``; on failure raise a one-line error naming the failing layer and shape."""
    import torch

    names = {id(m): n for n, m in model.named_modules()}
    entered: list[tuple[str, str, Any]] = []

    def pre_hook(module: Any, args: Any) -> None:
        entered.append((names.get(id(module), "?"), type(module).__name__, args[0] if args else None))

    hooks = [m.register_forward_pre_hook(pre_hook) for m in model.modules() if not list(m.children())]
    try:
        with torch.no_grad():
            return call_model(model, example)
    except Exception as exc:
        reason = first_line(exc)
        if entered:
            name, kind, value = entered[-1]
            where = f" at layer {name} ({kind}) with input {describe_input(value)}"
        else:
            where = ""
        raise UsageError(f"{what} {describe_input(example)} does not fit the model{where}: {reason}",
                         "pass an input of the shape the model expects") from None
    finally:
        for hook in hooks:
            hook.remove()


def output_layers(model: Any, example: Any = None) -> list[str]:
    """Names of the layers whose output width is fixed by the model's output: the classifier head(s).

    Uses ``get_classifier()`` (timm) when the model has it; otherwise the last Linear/Conv that ran
    on ``example`` with the model's output width, or without an example the last Linear by module order.
    """
    import torch
    from torch import nn

    layer_types = (nn.Linear, nn.modules.conv._ConvNd)
    names = {id(m): n for n, m in model.named_modules()}
    heads: list[str] = []
    get_classifier = getattr(model, "get_classifier", None)
    if callable(get_classifier):
        classifiers = get_classifier()
        for classifier in classifiers if isinstance(classifiers, (tuple, list)) else [classifiers]:
            if isinstance(classifier, nn.Module) and id(classifier) in names and any(
                    isinstance(m, layer_types) for m in classifier.modules()):
                heads.append(names[id(classifier)])
    if heads:
        return heads
    if example is None:
        linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
        return linears[-1:]
    order: list[tuple[str, Any]] = []
    hooks = [m.register_forward_hook(lambda mod, _i, out: order.append((names[id(mod)], out)))
             for m in model.modules() if isinstance(m, layer_types)]
    try:
        output = run_checked(model, example)
    finally:
        for hook in hooks:
            hook.remove()
    if isinstance(output, torch.Tensor):
        for name, out in reversed(order):
            if isinstance(out, torch.Tensor) and out.dim() == output.dim() and out.shape[-1] == output.shape[-1]:
                return [name]
    return []
