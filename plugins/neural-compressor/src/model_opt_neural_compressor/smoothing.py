"""SmoothQuant on an exported graph, before INC's static int8: each Linear's input is divided per channel by
``s`` and its weight's columns multiplied by ``s`` (an exact change in float), which moves the activation's outlier
channels into the weights, where per-channel quantization absorbs them.

``s_j = max|x_j| ** alpha / max|w_j| ** (1 - alpha)`` (Xiao et al., SmoothQuant), one ``s`` per input: the Linear
layers that read the same tensor (a block's query, key and value) share one division, so they still share one
quantized input. The division is a multiply node placed before those Linear layers only (a residual branch that
reads the same tensor keeps it unscaled); under torch.compile it fuses into the quantize step. With ``alpha=None``
each input gets the alpha (or no smoothing) whose int8 outputs come closest to the float ones on the calibration
batches, simulated with the quantizer's own rules (per-tensor activations, per-channel symmetric weights).
INC's own SmoothQuant needs intel_extension_for_pytorch, which has no build for the torch model-opt pins.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from model_opt.measure import call_model
from model_opt.modules import excluded
from torch import fx

LINEAR = torch.ops.aten.linear.default
#: The alphas tried for each input when none is given (``None``: that input is not smoothed).
ALPHAS: tuple[float | None, ...] = (None, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95)
#: Rows of each calibration batch used to compare the candidates (spread over the batch).
COMPARED_ROWS = 256


@dataclass
class _Input:
    """One tensor read by Linear layers: its per-channel range over the calibration batches, and each candidate
    alpha's squared error of those layers' int8 outputs."""

    linears: list[fx.Node]
    weights: list[torch.Tensor]
    low: torch.Tensor | None = None
    high: torch.Tensor | None = None
    errors: dict[float | None, float] = field(default_factory=dict)
    #: Each candidate alpha's scale and quantized scaled weights (fixed once the ranges are known).
    candidates: dict[float | None, tuple[torch.Tensor, list[torch.Tensor]]] = field(default_factory=dict)

    def scale(self, alpha: float | None) -> torch.Tensor:
        if alpha is None:
            return torch.ones_like(self.high)
        activation = torch.maximum(self.high.abs(), self.low.abs()).clamp(min=1e-5)
        weight = torch.stack([w.abs().amax(0) for w in self.weights]).amax(0).clamp(min=1e-5)
        return (activation ** alpha / weight ** (1 - alpha)).clamp(min=1e-5)


def _module_path(node: fx.Node) -> str:
    """The dotted name of the module a node was traced in (its innermost ``nn_module_stack`` entry)."""
    stack = node.meta.get("nn_module_stack") or {}
    return list(stack.values())[-1][0] if stack else ""


def _attr_owner(graph_module: fx.GraphModule, target: str) -> tuple[Any, str]:
    path, _, name = target.rpartition(".")
    return graph_module.get_submodule(path), name


def _weight(graph_module: fx.GraphModule, node: fx.Node) -> torch.Tensor | None:
    weight = node.args[1] if len(node.args) > 1 else None
    if not (isinstance(weight, fx.Node) and weight.op == "get_attr"):
        return None
    tensor = getattr(*_attr_owner(graph_module, weight.target))
    return tensor.detach().float() if isinstance(tensor, torch.Tensor) and tensor.dim() == 2 else None


def _observe(graph_module: fx.GraphModule, inputs: list[fx.Node], batches: list[Any],
             see: Callable[[int, torch.Tensor], None]) -> None:
    """Run the calibration batches with ``see(index, value)`` called on each node of ``inputs`` (as rows of its
    last dimension), through nodes added to the graph for the run and removed after it."""
    def record(value: torch.Tensor, index: int) -> torch.Tensor:
        if isinstance(value, torch.Tensor) and value.is_floating_point():
            see(index, value.detach().reshape(-1, value.shape[-1]).float())
        return value

    graph = graph_module.graph
    recorders = []
    for index, node in enumerate(inputs):
        with graph.inserting_after(node):
            recorders.append(graph.call_function(record, (node, index)))
    # run as INC runs the prepared graph on the calibration batches: a module over the same graph, without the
    # exported module's check that inputs come in the example's form (positional tuples for a dict example)
    runner = fx.GraphModule(graph_module, graph)
    try:
        with torch.no_grad():
            for batch in batches:
                call_model(runner, batch)
    finally:
        for recorder in recorders:
            graph.erase_node(recorder)
        graph_module.graph = graph  # owned by graph_module again (the runner took it), and recompiled


def _fake_int8(rows: torch.Tensor, low: float, high: float, symmetric: bool, seven_bit: bool = False
               ) -> torch.Tensor:
    """``rows`` through per-tensor int8 quantization of the range [low, high] (zero always inside it); 7-bit
    with ``seven_bit`` (the reduced range)."""
    low, high = min(low, 0.0), max(high, 0.0)
    levels = 127 if seven_bit else 255
    if symmetric:
        scale = max(-low, high) / (levels / 2) or 1.0
        return torch.clamp(torch.round(rows / scale), -(levels + 1) // 2, levels // 2) * scale
    scale = (high - low) / levels or 1.0
    zero = round(-low / scale)
    return (torch.clamp(torch.round(rows / scale) + zero, 0, levels) - zero) * scale


def _fake_weight(weight: torch.Tensor) -> torch.Tensor:
    """Per-output-channel symmetric int8, as the X86 quantizer quantizes Linear weights."""
    scale = (weight.abs().amax(1, keepdim=True) / 127.5).clamp(min=1e-12)
    return torch.clamp(torch.round(weight / scale), -128, 127) * scale


def _compare(entry: _Input, rows: torch.Tensor, symmetric: bool, seven_bit: bool = False) -> None:
    """Add each candidate alpha's squared output error on ``rows`` to ``entry.errors``."""
    rows = rows[torch.linspace(0, len(rows) - 1, min(len(rows), COMPARED_ROWS)).long()]
    references = [rows @ w.T for w in entry.weights]
    for alpha in ALPHAS:
        if alpha not in entry.candidates:
            scale = entry.scale(alpha)
            entry.candidates[alpha] = scale, [_fake_weight(w * scale) for w in entry.weights]
        scale, weights = entry.candidates[alpha]
        low, high = float((entry.low / scale).min()), float((entry.high / scale).max())
        quantized = _fake_int8(rows / scale, low, high, symmetric, seven_bit)
        error = sum(float(((quantized @ weight.T) - reference).square().sum())
                    for weight, reference in zip(weights, references, strict=True))
        entry.errors[alpha] = entry.errors.get(alpha, 0.0) + error


def smooth(graph_module: fx.GraphModule, batches: list[Any], alpha: float | None, exclude: list[str],
           act_sym: bool = False, seven_bit: bool = False) -> dict[str, int]:
    """Smooth the Linear layers of ``graph_module`` (an exported graph) not inside a module named by
    ``exclude``, with ``alpha`` or, when it is None, each input's best candidate of ``ALPHAS``; returns how many
    Linear layers were smoothed and how many were left as they were. The graph's weights are replaced, never
    scaled in place (they may be the user's model's tensors)."""
    linears = {node: _weight(graph_module, node) for node in graph_module.graph.nodes
               if node.op == "call_function" and node.target is LINEAR and isinstance(node.args[0], fx.Node)}
    linears = {node: weight for node, weight in linears.items() if weight is not None}
    readers = defaultdict(int)  # a weight two Linear nodes read (tied) is left as it is
    for node in linears:
        readers[node.args[1].target] += 1
    grouped: dict[fx.Node, list[fx.Node]] = defaultdict(list)
    for node in linears:
        if readers[node.args[1].target] == 1 and not excluded(_module_path(node), exclude):
            grouped[node.args[0]].append(node)
    entries = [_Input(group, [linears[node] for node in group]) for group in grouped.values()]
    sources = list(grouped)
    if not entries:
        return {"smoothed": 0, "unchanged": 0}

    def ranges(index: int, rows: torch.Tensor) -> None:
        entry = entries[index]
        low, high = rows.amin(0), rows.amax(0)
        entry.low = low if entry.low is None else torch.minimum(entry.low, low)
        entry.high = high if entry.high is None else torch.maximum(entry.high, high)

    _observe(graph_module, sources, batches, ranges)
    if alpha is None:
        _observe(graph_module, sources, batches,
                 lambda index, rows: _compare(entries[index], rows, act_sym, seven_bit))
    counts = {"smoothed": 0, "unchanged": 0}
    for index, (source, entry) in enumerate(zip(sources, entries, strict=True)):
        chosen = min(ALPHAS, key=lambda a: entry.errors[a]) if alpha is None and entry.high is not None else alpha
        if chosen is None or entry.high is None:
            counts["unchanged"] += len(entry.linears)
            continue
        scale = entry.scale(chosen)
        name = f"_smooth_quant_inverse_{index}"
        graph_module.register_buffer(name, (1.0 / scale).to(getattr(source.meta.get("val"), "dtype", torch.float32)))
        with graph_module.graph.inserting_after(source):
            inverse = graph_module.graph.get_attr(name)
        # A real tensor, not a fake one, as the constant's value: the X86 quantizer then leaves the multiply
        # unannotated (it quantizes a multiply of two fake tensors), so only the Linear's input is quantized.
        inverse.meta["val"] = getattr(graph_module, name)
        with graph_module.graph.inserting_after(inverse):
            divided = graph_module.graph.call_function(torch.ops.aten.mul.Tensor, (source, inverse))
        # its value's shape only: copying the source's module and partition records would make the quantizer
        # take the multiply for part of the module that produced its input (a ReLU's fusion pattern with a Linear)
        divided.meta = {key: source.meta[key] for key in ("val", "tensor_meta") if key in source.meta}
        for node in entry.linears:
            node.replace_input_with(source, divided)
            owner, attribute = _attr_owner(graph_module, node.args[1].target)
            original = getattr(owner, attribute)
            scaled = (original.detach().float() * scale).to(original.dtype)
            setattr(owner, attribute, torch.nn.Parameter(scaled, requires_grad=False)
                    if isinstance(original, torch.nn.Parameter) else scaled)
            counts["smoothed"] += 1
    graph_module.graph.lint()
    graph_module.recompile()
    return counts
