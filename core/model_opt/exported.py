"""A module backed by a torch.export program: it pickles as the serialized program (the graph modules
that quantization flows produce do not pickle) and rebuilds itself when unpickled."""

from __future__ import annotations

import io
from typing import Any

import torch
from torch import nn


class ExportedModule(nn.Module):
    """Run ``program.module()``; save as ``torch.export.save`` bytes inside model-opt artifacts."""

    def __init__(self, module: nn.Module, example_inputs: tuple[Any, ...], dynamic_batch: bool = True) -> None:
        super().__init__()
        self.module_ = module
        self._example = example_inputs
        self._dynamic_batch = dynamic_batch

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.module_(*args, **kwargs)

    def train(self, mode: bool = True) -> ExportedModule:
        """Exported graphs have no train/eval switch (calling it on them raises); only the flag changes."""
        self.training = mode
        return self

    def _program_bytes(self) -> bytes:
        program = None
        if self._dynamic_batch:
            batch = torch.export.Dim("batch", min=1)
            dynamic = tuple({0: batch} if isinstance(a, torch.Tensor) and a.dim() else None for a in self._example)
            try:
                program = torch.export.export(self.module_, self._example, dynamic_shapes=dynamic)
            except Exception:  # the graph specialized the batch size: save it static
                program = None
        if program is None:
            program = torch.export.export(self.module_, self._example)
        buffer = io.BytesIO()
        torch.export.save(program, buffer)
        return buffer.getvalue()

    def __getstate__(self) -> dict[str, Any]:
        return {"program": self._program_bytes(), "example": self._example, "dynamic_batch": self._dynamic_batch}

    def __setstate__(self, state: dict[str, Any]) -> None:
        nn.Module.__init__(self)
        self._example = state["example"]
        self._dynamic_batch = state["dynamic_batch"]
        self.module_ = torch.export.load(io.BytesIO(state["program"])).module()
