"""A causal LM as OpenVINO IR that decodes with a KV cache, without optimum-intel: the past keys and values are
explicit inputs and outputs of the IR (one pair per layer, dynamic length), and :class:`OpenVINOCausalLM` runs
greedy decoding around it in Python (``generate``), so model-opt's built-in evaluation times its decode.

The conversion fills a transformers ``DynamicCache`` with the past tensors directly: ``DynamicCache.update``
starts each layer by concatenating with an empty 1-D tensor, which OpenVINO's converter cannot concatenate."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from model_opt.decoding import count_runtime, greedy
from model_opt.errors import TechniqueError
from torch import nn

from .openvino_module import OpenVINOModule


class _WithExplicitCache(nn.Module):
    """``(input_ids, attention_mask, *past) -> (logits, *present)`` around a transformers causal LM."""

    def __init__(self, lm: nn.Module, layers: int) -> None:
        super().__init__()
        self.lm, self.layers = lm, layers

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, *past: torch.Tensor) -> tuple:
        from transformers import DynamicCache

        cache = DynamicCache(config=self.lm.config)
        for index in range(self.layers):
            layer = cache.layers[index]
            layer.lazy_initialization(past[2 * index], past[2 * index + 1])
            layer.keys, layer.values = past[2 * index], past[2 * index + 1]
        out = self.lm(input_ids=input_ids, attention_mask=attention_mask, past_key_values=cache, use_cache=True)
        present = [t for layer in out.past_key_values.layers[: self.layers] for t in (layer.keys, layer.values)]
        return (out.logits, *present)


def convert_causal_lm(model: nn.Module, example_ids: torch.Tensor) -> tuple[Any, dict[str, Any]]:
    """The model as OpenVINO IR with its KV cache as inputs/outputs, and the cache's layout (layers, heads,
    head size) for :class:`OpenVINOCausalLM`. Traced on the example's tokens after a few past ones."""
    import openvino as ov

    ids = example_ids[:1, :8]
    split = max(1, ids.shape[1] // 2)
    try:
        with torch.no_grad():
            probe = model(input_ids=ids[:, :split], use_cache=True).past_key_values
        layers = probe.layers
        past = [t for layer in layers for t in (layer.keys, layer.values)]
    except Exception as exc:
        detail = " ".join(str(exc).split())[:150]
        raise TechniqueError(f"the model's KV cache could not be read for OpenVINO ({detail})",
                             "use runtime=torch") from None
    _, heads, _, head_dim = past[0].shape
    wrapper = _WithExplicitCache(model, len(layers)).eval()
    rest = ids[:, split:]
    mask = torch.ones(1, ids.shape[1], dtype=torch.long)
    # named as optimum-intel names them; batch and lengths dynamic
    cache = [f"past_key_values.{i}.{kind}" for i in range(len(layers)) for kind in ("key", "value")]
    shapes = [(ov.PartialShape([-1, -1]), ov.Type.i64)] * 2 + \
             [(ov.PartialShape([-1, heads, -1, head_dim]), ov.Type.f32)] * len(past)
    try:
        ov_model = ov.convert_model(wrapper, example_input=(rest, mask, *past), input=shapes)
    except Exception as exc:
        raise TechniqueError(f"OpenVINO could not convert the model with its KV cache "
                             f"({' '.join(str(exc).split())[:200]})", "use runtime=torch") from None
    from model_opt.export import name_outputs

    for port, name in zip(ov_model.inputs, ["input_ids", "attention_mask", *cache], strict=True):
        port.get_tensor().set_names({name})  # (the cache is *past in the wrapper: no names to trace)
    name_outputs(ov_model, ["logits", *[name.replace("past_key_values", "present") for name in cache]])
    return ov_model, {"layers": len(layers), "heads": int(heads), "head_dim": int(head_dim)}


def stateful(ov_model: Any) -> Any:
    """A copy of the IR with its KV cache held inside OpenVINO, as optimum-intel lays it out: each past input
    becomes a state (ReadValue/Assign) that starts as zeros of the batch's size, reordered by a ``beam_idx``
    input. OpenVINO's CPU plugin fuses that layout with the attention into its own SDPA node with the KV cache,
    and no cache tensor crosses into Python at a step."""
    import openvino as ov
    import openvino.opset13 as ops
    from openvino._offline_transformations import apply_make_stateful_transformation

    model = ov_model.clone()
    past = [p for p in model.get_parameters() if p.get_output_tensor(0).get_any_name().startswith("past_key_values")]
    beam = ops.parameter(ov.PartialShape([-1]), ov.Type.i32, name="beam_idx")
    beam.output(0).get_tensor().set_names({"beam_idx"})
    for parameter in past:
        consumers = list(parameter.output(0).get_target_inputs())
        reordered = ops.gather(parameter, beam, ops.constant(np.int64(0)))
        for consumer in consumers:
            consumer.replace_source_output(reordered.output(0))
    model.add_parameters([beam])
    pairs = {name: name.replace("past_key_values", "present")
             for name in (p.get_output_tensor(0).get_any_name() for p in past)}
    apply_make_stateful_transformation(model, pairs)
    batch = ops.gather(ops.shape_of(model.input("input_ids"), output_type="i64"),
                       ops.constant(np.array([0], np.int64)), ops.constant(np.int64(0)))
    for op in model.get_ops():
        if op.get_type_name() == "ReadValue":  # (zeros: batch x heads x 0 x head size)
            dims = [dim.min_length for dim in op.get_output_partial_shape(0)]
            shape = ops.concat([batch, *[ops.constant(np.array([d], np.int64)) for d in dims[1:]]], 0)
            op.set_arguments([ops.broadcast(ops.constant(np.float32(0)), shape)])
    model.validate_nodes_and_infer_types()
    return model


def past_after(ov_model: Any) -> Callable[[np.ndarray, list[np.ndarray]], list[np.ndarray]]:
    """The IR with explicit cache inputs and outputs, compiled once, as a function: the past keys and values after
    tokens ``ids`` (1 x n) follow ``past`` (what NNCF's calibration feeds the IR at a decode step)."""
    import openvino as ov

    compiled = ov.Core().compile_model(ov_model, "CPU")

    def after(ids: np.ndarray, past: list[np.ndarray]) -> list[np.ndarray]:
        mask = np.ones((1, past[0].shape[2] + ids.shape[1]), np.int64)
        result = compiled([ids, mask, *past])
        return [result[i] for i in range(1, len(compiled.outputs))]

    return after


class OpenVINOCausalLM(OpenVINOModule):
    """An OpenVINO causal LM (IR from :func:`convert_causal_lm`, run as :func:`stateful` makes it):
    ``forward(input_ids)`` returns the logits of the whole sequence (the cache emptied first), ``generate`` decodes
    greedily, one token per step, the KV cache kept inside OpenVINO between steps."""

    #: Seconds spent inside OpenVINO's inference calls so far (the built-in evaluation splits decode time by it).
    runtime_seconds = 0.0

    def _runnable(self, ov_model: Any) -> Any:
        return stateful(ov_model)

    def _step(self, ids: np.ndarray, length: int, start: bool = False) -> np.ndarray:
        """The logits after feeding ``ids`` (1 x n) to the cache (emptied first when ``start``); a view that the
        next step overwrites."""
        if start:
            self._request.reset_state()
        started = time.perf_counter()
        self._request.infer({"input_ids": ids, "attention_mask": np.ones((1, length), np.int64),
                             "beam_idx": np.zeros(1, np.int32)}, share_inputs=True)
        count_runtime(self, started)
        return self._request.get_output_tensor(0).data

    def _compile(self) -> None:
        super()._compile()
        self._request = self.compiled.create_infer_request()  # (one request: the cache lives in its state)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **_: Any) -> Any:
        from transformers.modeling_outputs import CausalLMOutput

        rows = [self._step(row[None].cpu().numpy().astype(np.int64), row.shape[0], start=True).copy()
                for row in input_ids]
        return CausalLMOutput(logits=torch.from_numpy(np.concatenate(rows)))

    def generate(self, input_ids: torch.Tensor, max_new_tokens: int = 20, stopping_criteria: Any = None,
                 **_: Any) -> torch.Tensor:
        """Greedy decoding of batch 1 (:func:`model_opt.decoding.greedy`); ``stopping_criteria`` are called after
        every new token, as transformers calls them (model-opt's evaluation stamps the time there)."""
        length = [0]

        def step(tokens: list[int], start: bool) -> np.ndarray:
            length[0] = len(tokens) if start else length[0] + len(tokens)
            return self._step(np.array([tokens], dtype=np.int64), length[0], start)[0, -1]

        return greedy(step, input_ids.cpu(), max_new_tokens, stopping_criteria)
