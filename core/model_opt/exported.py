"""A module backed by a torch.export program.

Quantization flows (INC, pt2e) produce graph modules that do not pickle, and ``.eval()`` on a loaded
``.pt2`` module raises. This wrapper runs the graph, ignores train/eval switches, and keeps its state
as the serialized program (``torch.export.save`` bytes): its ``state_dict`` is that one uint8 tensor,
and ``load_state_dict`` rebuilds the graph from it, so artifacts hold it as plain weights.
"""

from __future__ import annotations

import contextlib
import contextvars
import io
import os
from collections import OrderedDict
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from .errors import ModelLoadError, first_line

PROGRAM_KEY = "program"


#: Packages whose output classes (Hugging Face ``ModelOutput``) register themselves with torch's pytree when
#: imported; a program returning one deserializes only after that import.
OUTPUT_PACKAGES = {"transformers": "transformers.modeling_outputs", "diffusers": "diffusers.models.modeling_outputs"}


#: Set while the user has said the file is trusted (``--trust-model``): programs are then loaded unchecked.
_TRUSTED: contextvars.ContextVar[bool] = contextvars.ContextVar("model_opt_trusted_programs", default=False)


@contextlib.contextmanager
def trusting(trusted: bool = True) -> Iterator[None]:
    """Within this block, programs load without the pickle check (the user trusts the file)."""
    token = _TRUSTED.set(trusted)
    try:
        yield
    finally:
        _TRUSTED.reset(token)


class UnsafeProgram(Exception):
    """A ``.pt2`` holds something torch.export.load would run code to open."""


def unsafe_program(name: str, exc: BaseException) -> ModelLoadError:
    """The one-line error for a program (named ``name``) that does not pass :func:`check_program`."""
    return ModelLoadError(f"{name} cannot be opened safely: {first_line(exc)}; torch.export.load would run code "
                          "from it", "pass --trust-model (trust_model=True) only if you trust where the file came "
                          "from")


def _weights_only(reader: Any, name: str) -> None:
    try:
        torch.load(io.BytesIO(reader.read_bytes(name)), weights_only=True)
    except Exception as exc:
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        detail = next((line for line in lines if "Unsupported" in line), lines[0] if lines else type(exc).__name__)
        detail = detail.replace("WeightsUnpickler error: ", "").split(". Please")[0]
        raise UnsafeProgram(f"{name} is a pickle that the weights-only unpickler refuses ({detail[:160]})") \
            from None


def program_names(names: list[str]) -> list[str]:
    """The programs ``torch.export.load`` deserializes from an archive holding ``names``, found its way: every
    file under ``models/`` (whatever its suffix) named by cutting the format's prefix and suffix lengths off."""
    from torch.export.pt2_archive import constants

    prefix, suffix = constants.MODELS_FILENAME_FORMAT.split("{}")
    return [n[len(prefix):-len(suffix)] for n in names if n.startswith(constants.MODELS_DIR)]


def check_program(program: bytes) -> None:
    """Raise :class:`UnsafeProgram` unless every pickle ``torch.export.load`` would unpickle in ``program``
    passes the weights-only unpickler, and it holds no compiled code (AOTInductor libraries).

    torch.export.load unpickles the sample inputs (falling back to full pickle), weights and constants marked
    ``use_pickle``, legacy weight files, custom and opaque objects, and opens AOTInductor packages; an archive
    it does not recognise goes to a legacy loader that unpickles too. Each of those is checked here first."""
    from torch.export.pt2_archive import _package as pkg
    from torch.export.pt2_archive import constants

    try:
        reader_cm = pkg.PT2ArchiveReader(io.BytesIO(program))
    except Exception as exc:
        raise ValueError(f"not a torch.export archive ({str(exc).strip()[:120]})") from None
    with reader_cm as reader:
        names = reader.get_file_names()
        if constants.ARCHIVE_VERSION_PATH not in names or \
                reader.read_string(constants.ARCHIVE_VERSION_PATH) != constants.ARCHIVE_VERSION_VALUE:
            raise UnsafeProgram("it is not in this torch's .pt2 archive format, and older formats are unpickled")
        native = (constants.AOTINDUCTOR_DIR, constants.MTIA_DIR, constants.EXECUTORCH_DIR)
        compiled = [n for n in names if n.startswith(native)]
        if compiled:
            raise UnsafeProgram(f"it holds compiled code ({compiled[0]}), which loads as a native library")
        for model in program_names(names):
            for name in (constants.SAMPLE_INPUTS_FILENAME_FORMAT.format(model), f"{constants.WEIGHTS_DIR}{model}.pt",
                         f"{constants.CONSTANTS_DIR}{model}.pt"):
                if name in names:
                    _weights_only(reader, name)
            for config_format, folder in ((constants.WEIGHTS_CONFIG_FILENAME_FORMAT, constants.WEIGHTS_DIR),
                                          (constants.CONSTANTS_CONFIG_FILENAME_FORMAT, constants.CONSTANTS_DIR)):
                config_name = config_format.format(model)
                if config_name not in names:
                    continue
                for meta in pkg._load_payload_config(reader, config_name).config.values():
                    path = meta.path_name
                    if path.startswith((constants.CUSTOM_OBJ_FILENAME_PREFIX, constants.OPAQUE_OBJ_FILENAME_PREFIX)):
                        raise UnsafeProgram(f"it holds a pickled object ({folder}{path}), which runs code to open")
                    if meta.use_pickle:
                        _weights_only(reader, os.path.join(folder, path))  # the name torch's loader reads


def load_program(program: bytes) -> nn.Module:
    """The runnable module of ``torch.export.save`` bytes, after :func:`check_program` (unless trusted).

    Quantized programs (INC, pt2e) call ``quantized_decomposed`` ops, and Hugging Face models return
    ``ModelOutput`` classes: both must be registered before deserializing, so those (installed, known) modules
    are imported first."""
    import importlib
    import logging

    import torch.ao.quantization.fx._decomposed  # noqa: F401

    if not _TRUSTED.get():
        check_program(program)

    text = program.decode("latin-1")
    for package, module in OUTPUT_PACKAGES.items():
        if f"{package}." in text:
            try:
                importlib.import_module(module)
            except ImportError:
                pass
    logger = logging.getLogger("torch.export")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        return torch.export.load(io.BytesIO(program)).module()
    finally:
        logger.setLevel(level)


class ExportedModule(nn.Module):
    """Run ``module`` (a graph module from torch.export); save it as ``torch.export.save`` bytes."""

    def __init__(self, module: nn.Module | None = None, example_inputs: Any = (),
                 dynamic_batch: bool = True, program: bytes | None = None) -> None:
        """``example_inputs``: a model input in any form (tensor, tuple of positional tensors, dict)."""
        super().__init__()
        self.module_ = module
        self._example = example_inputs
        self._dynamic_batch = dynamic_batch
        self._program = program

    @classmethod
    def from_bytes(cls, program: bytes) -> ExportedModule:
        """Open ``torch.export.save`` bytes (a ``.pt2`` file's content)."""
        return cls(load_program(program), program=program)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if self.module_ is None:
            raise RuntimeError("this ExportedModule holds no program yet; load_state_dict() gives it one")
        return self.module_(*args, **kwargs)

    def train(self, mode: bool = True) -> ExportedModule:
        """Exported graphs have no train/eval switch (calling it on them raises); only the flag changes."""
        self.training = mode
        return self

    def program_bytes(self) -> bytes:
        """The serialized program, exported once from the graph (dynamic batch where the graph allows)."""
        from .measure import export_program

        if self._program is not None:
            return self._program
        program = export_program(self.module_, self._example, self._dynamic_batch)
        buffer = io.BytesIO()
        torch.export.save(program, buffer)
        self._program = buffer.getvalue()
        return self._program

    def state_dict(self, *args: Any, destination: Any = None, prefix: str = "", keep_vars: bool = False) -> Any:
        destination = OrderedDict() if destination is None else destination
        destination[prefix + PROGRAM_KEY] = torch.frombuffer(bytearray(self.program_bytes()), dtype=torch.uint8)
        return destination

    def load_state_dict(self, state_dict: Any, strict: bool = True, assign: bool = False) -> Any:
        """Rebuild the graph from the serialized program (a .pt2 loads without unpickling code)."""
        unexpected = [k for k in state_dict if k != PROGRAM_KEY]
        if PROGRAM_KEY not in state_dict or (strict and unexpected):
            raise RuntimeError(f"Error(s) in loading state_dict for {type(self).__name__}: expected only "
                               f"{PROGRAM_KEY!r}, got {sorted(state_dict)[:5]}")
        program = state_dict[PROGRAM_KEY].cpu().numpy().tobytes()
        self.module_ = load_program(program)
        self._program = program
        return nn.modules.module._IncompatibleKeys([], unexpected)

    def __getstate__(self) -> dict[str, Any]:
        return {"program": self.program_bytes(), "example": self._example, "dynamic_batch": self._dynamic_batch}

    def __setstate__(self, state: dict[str, Any]) -> None:
        nn.Module.__init__(self)
        self._example = state["example"]
        self._dynamic_batch = state["dynamic_batch"]
        self._program = state["program"]
        self.module_ = load_program(state["program"])
