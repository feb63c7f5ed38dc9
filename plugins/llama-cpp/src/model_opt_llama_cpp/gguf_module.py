"""A GGUF file run by llama.cpp (through llama-cpp-python) as a torch module, so that the built-in evaluation and
the timings measure what a user runs: ``forward(input_ids)`` returns the logits of every position (perplexity,
next-token agreement, prefill), ``generate`` decodes greedily with llama.cpp's KV cache, one token per step (decode
tokens/s). llama.cpp uses the process's torch thread count, as the report states it."""

from __future__ import annotations

import atexit
import os
import sys
import tempfile
import time
import weakref
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from model_opt.decoding import count_runtime, greedy
from model_opt.errors import ModelLoadError
from torch import nn


def _close_devnull() -> None:
    """llama-cpp-python opens /dev/null twice when imported (to silence llama.cpp while it loads a model) and
    leaves the files to the interpreter's exit, which then warns of them: closed at exit instead."""
    utils = sys.modules.get("llama_cpp._utils")
    for handle in (getattr(utils, "outnull_file", None), getattr(utils, "errnull_file", None)):
        if handle is not None:
            handle.close()


atexit.register(_close_devnull)

#: The file inside an output folder: what a user hands to llama.cpp or Ollama.
FOLDER_GGUF = "model.gguf"
#: The longest context opened (the model's own is used when shorter): the KV cache is sized for it.
MAX_CONTEXT = 4096


class GGUFModule(nn.Module):
    """A GGUF model behind ``forward`` and ``generate``: token ids in, logits or tokens out."""

    #: model-opt times a model of another runtime than the original's in a process of its own.
    deployed_runtime = "llama.cpp"
    #: ``model-opt export --format gguf`` writes the file as it is.
    native_format = "gguf"

    def __init__(self, path: str | os.PathLike[str] | None = None) -> None:
        """``path=None`` makes an empty module that :meth:`load_native` or :meth:`load_state_dict` fills."""
        super().__init__()
        self.device_anchor = nn.Parameter(torch.zeros(0), requires_grad=False)
        self._llm: Any = None
        self._path: Path | None = None
        if path is not None:
            self._open(Path(path))

    # -- opening -------------------------------------------------------------------------------
    def _open(self, path: Path) -> None:
        from llama_cpp import Llama

        context = min(_context_length(path), MAX_CONTEXT)
        try:
            # read, not memory-mapped: llama.cpp's CPU backend repacks 4-bit weights into a layout of its own, and
            # a mapped file would keep every page it read for that beside the repacked copy (the weights twice)
            self._llm = Llama(model_path=str(path), n_ctx=context, n_batch=min(512, context),
                              n_threads=torch.get_num_threads(), n_threads_batch=torch.get_num_threads(),
                              logits_all=True, use_mmap=False, verbose=False)
        except Exception as exc:
            detail = " ".join(str(exc).split())[:120]
            raise ModelLoadError(f"{path.name} is not a GGUF model llama.cpp can load ({detail})",
                                 "re-create it with model-opt optimize --quant-backend llama-cpp") from None
        self._path = path

    def _own_copy(self, data: bytes) -> None:
        """Open ``data`` from a temporary file of this module's own (removed with the module)."""
        fd, name = tempfile.mkstemp(prefix="model-opt-gguf-", suffix=".gguf")
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        weakref.finalize(self, _remove, name)
        self._open(Path(name))

    def _data(self) -> bytes:
        assert self._path is not None, "an empty GGUFModule: load_native or load_state_dict fills it"
        return self._path.read_bytes()

    # -- running -------------------------------------------------------------------------------
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **_: Any) -> Any:
        from transformers.modeling_outputs import CausalLMOutput

        rows = []
        for row in input_ids:
            self._check_length(row.shape[0])
            self._llm.reset()
            self._eval(row.tolist())
            rows.append(np.array(self._llm.scores[: row.shape[0]]))
        return CausalLMOutput(logits=torch.from_numpy(np.stack(rows)))

    def generate(self, input_ids: torch.Tensor, max_new_tokens: int = 20, stopping_criteria: Any = None,
                 **_: Any) -> torch.Tensor:
        """Greedy decoding of batch 1 with llama.cpp's KV cache (:func:`model_opt.decoding.greedy`); only the last
        position's logits are computed at each step, as llama.cpp's own generation does. ``stopping_criteria``
        are called after every new token, as transformers calls them (model-opt's evaluation stamps the time
        there)."""
        import llama_cpp

        self._check_length(input_ids.shape[1] + max_new_tokens)
        llm, vocab = self._llm, self._llm.n_vocab()

        def step(tokens: list[int], start: bool) -> np.ndarray:
            if start:
                llm.reset()
            self._eval(tokens)
            return np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(vocab,))

        llm._logits_all = False  # (llama-cpp-python reads it at every eval: only the last logits are computed)
        try:
            return greedy(step, input_ids, max_new_tokens, stopping_criteria)
        finally:
            llm._logits_all = True

    #: Seconds spent inside llama.cpp's evaluation calls so far (the built-in evaluation splits decode time by it).
    runtime_seconds = 0.0

    def _eval(self, tokens: list[int]) -> None:
        started = time.perf_counter()
        self._llm.eval(tokens)
        count_runtime(self, started)

    def _check_length(self, length: int) -> None:
        if length > self._llm.n_ctx():
            raise ValueError(f"{length} tokens do not fit the {self._llm.n_ctx()}-token context opened for this GGUF "
                             "model; use shorter windows (MODEL_OPT_LM_WINDOW)")

    # -- what model-opt reads ------------------------------------------------------------------
    def keep_float(self, path: Path) -> GGUFModule:
        """Keep the float32 GGUF this model was quantized from, for :meth:`float_counterpart` (not saved)."""
        self._float_path = path
        return self

    def float_counterpart(self) -> GGUFModule | None:
        """The float32 GGUF in llama.cpp (what llama.cpp gives without quantizing); None for a reopened result."""
        path = getattr(self, "_float_path", None)
        return GGUFModule(path) if path is not None and Path(path).exists() else None

    def parameter_count(self) -> tuple[int, int]:
        """(weights, weights) of the GGUF's matrices, as model-opt reports them."""
        import gguf

        reader = gguf.GGUFReader(str(self._path))
        total = sum(int(np.prod(t.shape)) for t in reader.tensors if len(t.shape) > 1)
        return total, total

    # -- saving and reopening ------------------------------------------------------------------
    def save_native(self, artifact: str | os.PathLike[str]) -> list[Path]:
        """Write the GGUF file, atomically: ``model.gguf`` inside a folder output, else ``<artifact>.gguf``."""
        from model_opt.atomic import atomic_path

        target = Path(artifact) / FOLDER_GGUF if Path(artifact).is_dir() else Path(artifact).with_suffix(".gguf")
        with atomic_path(target) as tmp:
            tmp.write_bytes(self._data())
        return [target]

    def load_native(self, folder: str | os.PathLike[str]) -> None:
        """Open the ``model.gguf`` that :meth:`save_native` wrote into ``folder`` (a regular file; GGUF holds no
        code)."""
        path = Path(folder) / FOLDER_GGUF
        if path.is_symlink() or not path.is_file():
            raise ModelLoadError(f"{Path(folder).name} has no {FOLDER_GGUF} (a regular file)",
                                 "re-create the folder with model-opt optimize")
        self._open(path)

    def state_dict(self, *args: Any, destination: Any = None, prefix: str = "", keep_vars: bool = False) -> Any:
        """The GGUF file as one uint8 tensor: model-opt artifacts save it as plain weights, and size-on-disk
        measurements see the deployed file."""
        destination = OrderedDict() if destination is None else destination
        destination[prefix + "gguf"] = torch.frombuffer(bytearray(self._data()), dtype=torch.uint8)
        return destination

    def load_state_dict(self, state_dict: Any, strict: bool = True, assign: bool = False) -> Any:
        unexpected = [k for k in state_dict if k != "gguf"]
        if "gguf" not in state_dict or (strict and unexpected):
            raise RuntimeError(f"Error(s) in loading state_dict for GGUFModule: expected gguf, got "
                               f"{sorted(state_dict)[:5]}")
        self._own_copy(state_dict["gguf"].cpu().numpy().tobytes())
        return nn.modules.module._IncompatibleKeys([], unexpected)

    def __getstate__(self) -> dict[str, Any]:
        state = {k: v for k, v in self.__dict__.items() if k not in ("_llm", "_path", "_float_path")}
        state["_gguf_bytes"] = self._data() if self._path is not None else None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        data = state.pop("_gguf_bytes", None)
        self.__dict__.update(state)
        self._llm, self._path = None, None
        if data is not None:
            self._own_copy(data)


def _context_length(path: Path) -> int:
    """The context length the GGUF file declares (``<arch>.context_length``); a file that is not GGUF is a
    one-line error."""
    import gguf

    try:
        reader = gguf.GGUFReader(str(path))
        arch = bytes(reader.fields["general.architecture"].parts[-1]).decode()
        field = reader.fields[f"{arch}.context_length"]
        return int(field.parts[-1][0])
    except Exception as exc:
        raise ModelLoadError(f"{path.name} is not a GGUF file model-opt can read ({type(exc).__name__}: "
                             f"{' '.join(str(exc).split())[:100]})", "re-create it with model-opt optimize "
                             "--quant-backend llama-cpp") from None


def _remove(name: str) -> None:
    try:
        os.unlink(name)
    except OSError:
        pass
