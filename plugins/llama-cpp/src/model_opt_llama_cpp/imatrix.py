"""An importance matrix from calibration text, as llama.cpp's ``llama-imatrix`` tool makes one: for every matrix
the quantizer rounds, the mean square of each of its input channels over the calibration tokens. llama.cpp's
quantizer weights each column's rounding error by it (``llama_model_quantize_params.imatrix``), so the channels
that carry large activations are rounded more carefully: it matters most for 4-bit and lower types."""

from __future__ import annotations

import ctypes
from collections.abc import Iterable
from typing import Any

import numpy as np
import torch
from model_opt.measure import call_model
from torch import nn

from .convert import tensor_names

#: The types an ``imatrix=auto`` run computes one for (the 4-bit ones; others take ``imatrix=on``).
LOW_BIT = ("q4_k_m", "q4_k_s", "q4_0")


def importance_matrix(model: nn.Module, arch: str, batches: Iterable[Any]) -> tuple[dict[str, np.ndarray], int]:
    """(GGUF tensor name -> float32 mean square of each input channel, tokens seen) over ``batches`` of model
    inputs, for every Linear (GPT-2: Conv1D) layer the GGUF file holds."""
    names = tensor_names(model, arch)
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    hooks = []

    def record(target: str) -> Any:
        def hook(_module: nn.Module, inputs: tuple[Any, ...]) -> None:
            x = inputs[0].detach().to(torch.float64)
            x = x.reshape(-1, x.shape[-1])
            sums[target] = sums.get(target, 0) + x.square().sum(0)
            counts[target] = counts.get(target, 0) + x.shape[0]
        return hook

    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D":
            target = names.get_name(f"{name}.weight", try_suffixes=(".weight",))
            if target is not None:
                hooks.append(module.register_forward_pre_hook(record(target)))
    tokens = 0
    try:
        with torch.no_grad():
            for batch in batches:
                call_model(model, batch)
                ids = batch["input_ids"] if isinstance(batch, dict) else batch
                tokens += int(torch.as_tensor(ids).numel())
    finally:
        for hook in hooks:
            hook.remove()
    return {t: (sums[t] / counts[t]).to(torch.float32).numpy() for t in sums}, tokens


class CMatrix:
    """The matrix as llama.cpp's quantizer reads it: a ``llama_model_imatrix_data`` array ended by an empty entry;
    this object owns the memory the array points into (keep it alive while the quantizer runs)."""

    def __init__(self, matrix: dict[str, np.ndarray]) -> None:
        import llama_cpp

        self._names = [name.encode() for name in matrix]
        self._values = [np.ascontiguousarray(values, dtype=np.float32) for values in matrix.values()]
        entries = (llama_cpp.llama_model_imatrix_data * (len(matrix) + 1))()
        for entry, name, values in zip(entries, self._names, self._values, strict=False):
            entry.name = name
            entry.data = values.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
            entry.size = values.size
        self.array = entries

    def pointer(self) -> Any:
        import llama_cpp

        return ctypes.cast(self.array, ctypes.POINTER(llama_cpp.llama_model_imatrix_data))
