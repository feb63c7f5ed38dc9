"""A causal LM as OpenVINO IR that decodes with a KV cache, without optimum-intel: the past keys and values are
explicit inputs and outputs of the IR (one pair per layer, dynamic length), and :class:`OpenVINOCausalLM` runs
greedy decoding around it in Python (``generate``), so model-opt's built-in evaluation times its decode.

The conversion fills a transformers ``DynamicCache`` with the past tensors directly: ``DynamicCache.update``
starts each layer by concatenating with an empty 1-D tensor, which OpenVINO's converter cannot concatenate."""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch
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


class OpenVINOCausalLM(OpenVINOModule):
    """An OpenVINO causal LM (IR from :func:`convert_causal_lm`): ``forward(input_ids)`` returns the logits of
    the whole sequence (empty cache), ``generate`` decodes greedily, one token per step, with the KV cache."""

    def _empty_past(self) -> list[np.ndarray]:
        kv = self.compile_config["kv"]
        return [np.zeros((1, kv["heads"], 0, kv["head_dim"]), np.float32) for _ in range(2 * kv["layers"])]

    #: Seconds spent inside OpenVINO's inference calls so far (the built-in evaluation splits decode time by it).
    runtime_seconds = 0.0

    def _step(self, ids: np.ndarray, length: int, past: list[np.ndarray]) -> tuple[np.ndarray, list[np.ndarray]]:
        started = time.perf_counter()
        result = self.compiled([ids, np.ones((1, length), np.int64), *past])
        self.runtime_seconds += time.perf_counter() - started
        return result[0], [result[i] for i in range(1, len(past) + 1)]

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **_: Any) -> Any:
        from transformers.modeling_outputs import CausalLMOutput

        rows = [self._step(row[None].cpu().numpy().astype(np.int64), row.shape[0], self._empty_past())[0]
                for row in input_ids]
        return CausalLMOutput(logits=torch.from_numpy(np.concatenate(rows)))

    def generate(self, input_ids: torch.Tensor, max_new_tokens: int = 20, stopping_criteria: Any = None,
                 **_: Any) -> torch.Tensor:
        """Greedy decoding of batch 1; ``stopping_criteria`` are called after every new token, as transformers
        calls them (model-opt's evaluation stamps the time there)."""
        if input_ids.shape[0] != 1:
            raise ValueError("OpenVINOCausalLM.generate decodes one sequence at a time")
        tokens = input_ids.cpu().numpy().astype(np.int64)
        logits, past = self._step(tokens, tokens.shape[1], self._empty_past())
        for _ in range(max_new_tokens):
            nxt = logits[:, -1:].argmax(-1).astype(np.int64)
            tokens = np.concatenate([tokens, nxt], axis=1)
            sequence = torch.from_numpy(tokens)
            if stopping_criteria is not None and bool(stopping_criteria(sequence, torch.from_numpy(logits[:, -1]))
                                                      .all()):
                break
            if tokens.shape[1] - input_ids.shape[1] >= max_new_tokens:
                break
            logits, past = self._step(nxt, tokens.shape[1], past)
        return torch.from_numpy(tokens)
