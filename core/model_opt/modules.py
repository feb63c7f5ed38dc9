"""Helpers for plugin authors that walk a model's module tree.

- :func:`excluded` / :func:`selected`: module selection by name or prefix (the ``exclude`` option);
- :func:`set_module`: replace a submodule by its dotted name;
- :func:`device_of`: the device of a model's first parameter;
- :func:`linear_from_conv1d`: transformers' ``Conv1D`` (GPT-2 family) as the equivalent ``nn.Linear``;
- :func:`structure_snapshot`, :func:`structure_changes`, :func:`rebuild_structure`: record which layer
  shapes and size attributes a technique changed (pruned channels, heads), as JSON, and rebuild those
  shapes on a fresh copy of the architecture, which is what a ``restore`` hook needs for any technique
  that only resizes existing layers.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def excluded(name: str, exclude: Sequence[str]) -> bool:
    """True when ``name`` is one of ``exclude`` or inside one of them (a dotted prefix)."""
    return any(name == e or name.startswith(f"{e}.") for e in exclude)


def selected(name: str, include: Sequence[str] = (), exclude: Sequence[str] = ()) -> bool:
    """True when ``name`` is included (everything, when ``include`` is empty) and not excluded."""
    return (not include or excluded(name, include)) and not excluded(name, exclude)


def set_module(model: Any, name: str, new: Any) -> None:
    """Replace the submodule called ``name`` (dotted) by ``new``."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def device_of(model: Any) -> str:
    """The device of the model's first parameter (``cpu`` for a model without parameters)."""
    parameters = getattr(model, "parameters", None)
    if callable(parameters):
        for tensor in parameters():
            return str(tensor.device)
    return str(getattr(model, "device", "cpu"))  # e.g. a diffusers pipeline


def linear_from_conv1d(model: Any) -> list[str]:
    """Replace every transformers ``Conv1D`` (GPT-2's projections: ``x @ W + b`` with W stored (in, out)) by the
    ``nn.Linear`` that computes the same, so that every technique that handles Linear layers handles these;
    returns the replaced names. Found by duck typing (class name and ``nf``), without importing transformers."""
    import torch

    names = [name for name, module in model.named_modules() if type(module).__name__ == "Conv1D"
             and hasattr(module, "nf") and getattr(module, "weight", None) is not None and module.weight.dim() == 2]
    for name in names:
        conv = model.get_submodule(name)
        linear = torch.nn.Linear(conv.weight.shape[0], conv.weight.shape[1], bias=conv.bias is not None,
                                 device=conv.weight.device, dtype=conv.weight.dtype)
        with torch.no_grad():
            linear.weight.copy_(conv.weight.t())
            if conv.bias is not None:
                linear.bias.copy_(conv.bias)
        set_module(model, name, linear)
    return names


def _sizes(module: Any) -> dict[str, Any]:
    """A module's integer size attributes (in_features, num_heads, normalized_shape, ...)."""
    found: dict[str, Any] = {}
    for key, value in vars(module).items():
        if key.startswith("_") or isinstance(value, bool):
            continue
        if isinstance(value, int) or (isinstance(value, tuple) and value and all(
                isinstance(v, int) and not isinstance(v, bool) for v in value)):
            found[key] = value
    return found


def structure_snapshot(model: Any) -> dict[str, Any]:
    """Shapes of every parameter and buffer, and the size attributes of every module."""
    shapes: dict[str, list[int]] = {}
    sizes: dict[str, dict[str, Any]] = {}
    for name, module in model.named_modules():
        prefix = f"{name}." if name else ""
        for key, tensor in [*module._parameters.items(), *module._buffers.items()]:
            if tensor is not None:
                shapes[prefix + key] = list(tensor.shape)
        sizes[name] = _sizes(module)
    return {"shapes": shapes, "sizes": sizes}


def structure_changes(before: dict[str, Any], model: Any) -> dict[str, Any]:
    """What changed since ``before`` (a :func:`structure_snapshot`), as JSON for :func:`rebuild_structure`."""
    after = structure_snapshot(model)
    shapes = {k: v for k, v in after["shapes"].items() if before["shapes"].get(k) != v}
    sizes: dict[str, dict[str, Any]] = {}
    for name, values in after["sizes"].items():
        old = before["sizes"].get(name, {})
        changed = {k: list(v) if isinstance(v, tuple) else v for k, v in values.items() if old.get(k) != v}
        if changed:
            sizes[name] = changed
    return {"shapes": shapes, "sizes": sizes}


def rebuild_structure(model: Any, changes: dict[str, Any]) -> Any:
    """Give ``model`` the recorded shapes (empty tensors, to be filled by ``load_state_dict``) and sizes."""
    import torch

    for full_name, shape in changes.get("shapes", {}).items():
        module_name, _, key = full_name.rpartition(".")
        module = model.get_submodule(module_name) if module_name else model
        if key in module._parameters and module._parameters[key] is not None:
            old = module._parameters[key]
            module._parameters[key] = torch.nn.Parameter(torch.empty(shape, dtype=old.dtype, device=old.device),
                                                         requires_grad=old.requires_grad)
        elif key in module._buffers and module._buffers[key] is not None:
            old = module._buffers[key]
            module._buffers[key] = torch.empty(shape, dtype=old.dtype, device=old.device)
        else:
            raise ValueError(f"{full_name} is not a parameter or buffer of this architecture")
    for module_name, values in changes.get("sizes", {}).items():
        module = model.get_submodule(module_name) if module_name else model
        for key, value in values.items():
            setattr(module, key, tuple(value) if isinstance(getattr(module, key, None), tuple) else value)
    return model
