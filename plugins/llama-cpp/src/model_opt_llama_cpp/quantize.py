"""The ``gguf`` technique: the causal LM written as float32 GGUF (:mod:`.convert`), then quantized to the requested
type by llama.cpp's own quantizer (``llama_model_quantize``), and run in llama.cpp (:class:`.GGUFModule`)."""

from __future__ import annotations

import ctypes
import shutil
import tempfile
import weakref
from pathlib import Path
from typing import Any

from model_opt.errors import TechniqueError
from model_opt.result import TechniqueResult
from torch import nn

from .convert import architecture, write_gguf
from .gguf_module import GGUFModule
from .imatrix import LOW_BIT, CMatrix, importance_matrix
from .plugin import TYPES


def ftype(name: str) -> int:
    """llama.cpp's file-type number for a type name of :data:`TYPES`."""
    import llama_cpp

    constant = "LLAMA_FTYPE_ALL_F32" if name == "f32" else f"LLAMA_FTYPE_MOSTLY_{name.upper()}"
    value = getattr(llama_cpp, constant, None)
    if value is None:
        offered = [t for t in TYPES if t == "f32" or hasattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{t.upper()}")]
        raise TechniqueError(f"the installed llama.cpp has no GGUF type {name}",
                             f"choose one of: {', '.join(offered)}")
    return int(value)


def quantize_gguf(model: nn.Module, options: dict[str, Any], context: Any) -> TechniqueResult:
    """Convert, quantize, and open the result in llama.cpp (the float32 file kept for the report's split)."""
    import llama_cpp
    import torch

    kind = options["type"]
    number = ftype(kind)
    architecture(model)  # (refused before any work)
    folder = _tokenizer_folder(model, context)
    work = Path(tempfile.mkdtemp(prefix="model-opt-gguf-"))
    source = work / "model-f32.gguf"
    context.progress("writing the model as float32 GGUF (gguf)")
    info = write_gguf(model, folder, source, folder.name)
    target = work / f"model-{kind}.gguf"
    if kind == "f32":
        target = source
    else:
        context.progress(f"quantizing to {kind} with llama.cpp's quantizer")
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = number
        params.nthread = torch.get_num_threads()
        matrix = _importance(model, kind, options["imatrix"], context, info)
        if matrix is not None:
            params.imatrix = matrix.pointer()
        if llama_cpp.llama_model_quantize(str(source).encode(), str(target).encode(), ctypes.byref(params)) != 0:
            raise TechniqueError(f"llama.cpp could not quantize the model to {kind} (see the log beside the output)",
                                 "try another type, such as q8_0")
    module = GGUFModule(target).keep_float(source)
    weakref.finalize(module, shutil.rmtree, work, True)  # (the files go with the module)
    info.update({"type": kind, "runtime": "llama.cpp", "file_bytes": target.stat().st_size,
                 "threads": torch.get_num_threads()})
    return TechniqueResult(module, info, {}, standalone=True)


def _importance(model: nn.Module, kind: str, choice: str, context: Any, info: dict[str, Any]) -> CMatrix | None:
    """The importance matrix for llama.cpp's quantizer, when ``imatrix`` asks for one (``auto``: a 4-bit type
    and calibration text at hand); what was done goes into ``info``."""
    if choice == "off" or (choice == "auto" and (kind not in LOW_BIT or context.calibration_data is None)):
        info["imatrix"] = "none"
        return None
    batches = list(context.calibration_inputs())
    if not batches:
        raise TechniqueError("calibration_data(dataset_path) yielded nothing", "make it yield model inputs, or "
                             "pass --quant-opt imatrix=off")
    context.progress(f"importance matrix over {len(batches)} calibration inputs")
    matrix, tokens = importance_matrix(model, architecture(model), batches)
    info["imatrix"] = f"{len(matrix)} matrices from {tokens} calibration tokens"
    return CMatrix(matrix)


def _tokenizer_folder(model: nn.Module, context: Any) -> Path:
    """The folder with the model's tokenizer: the model's own folder (the CLI's MODEL), else where transformers
    loaded it from."""
    for candidate in (getattr(context, "model_path", None), getattr(model, "name_or_path", None)):
        if candidate and Path(candidate).is_dir():
            return Path(candidate)
    raise TechniqueError("a GGUF file carries the model's tokenizer, and this model has no folder to read it from",
                         "optimize the model's Hugging Face folder (with its tokenizer files)")
