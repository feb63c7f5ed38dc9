"""Open a model, whatever the user gives: the one routine every command and worker uses (:func:`open_model`) and
the dispatcher behind ``model_opt.load`` (:func:`load`).

Input files are read with ``torch.load(weights_only=True)``, as a torch.export ``.pt2`` program (checked first:
:mod:`model_opt.exported`), as TorchScript, by a plugin's ``load_model`` hook (OpenVINO IR), as a Hugging Face
folder (:mod:`model_opt.hf`) or as model-opt's own artifact (:mod:`model_opt.artifact`). A whole pickled
``nn.Module`` runs code when unpickled, so it is loaded only with ``trust_model=True`` (``--trust-model``) or
through the test script's own ``load_model``.
"""

from __future__ import annotations

import os
import zipfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .artifact.format import is_artifact
from .artifact.read import load_artifact, load_weights
from .errors import ModelLoadError, TestScriptError, first_line
from .hf import open_folder
from .sources import as_module, importable, quiet_torch_logs, read_regular, resolve_model_path

if TYPE_CHECKING:
    from .testscript import TestScript


def search_paths(model_path: str | os.PathLike[str], script: TestScript | None, trust_model: bool) -> list[Path]:
    """Folders importable while the model loads: the test script's; the model's own folder only when the
    user trusts the model (a file downloaded beside it must not shadow the user's modules), and after."""
    return [*([script.folder] if script else []), *([Path(model_path).parent] if trust_model else [])]


def open_model(model_path: str | os.PathLike[str], script: TestScript | None, trust_model: bool) -> Any:
    """The one way every command (and every timing or memory process) opens a model: the test script's
    ``load_model`` when it has one, else the safe formats (artifacts replayed, Hugging Face folders), with
    :func:`search_paths` importable."""
    loader = (lambda p: script.call("load_model", p)) if script is not None and script.has("load_model") else None
    return load(model_path, trust_model=trust_model, loader=loader,
                search_paths=search_paths(model_path, script, trust_model))


def check_readable(path: str | os.PathLike[str], allow_folder: bool = False) -> Path:
    """The path of a readable model file (or folder, where a loader can open one); else a one-line error."""
    path = resolve_model_path(path)
    if not path.exists():
        raise ModelLoadError(f"model file not found: {path}", "check the path")
    if path.is_dir():
        if not allow_folder and not (path / "config.json").is_file() and not is_artifact(path):
            raise ModelLoadError(f"{path} is a folder, not a model file",
                                 "pass the model file itself, or define load_model(path) in the test script")
    elif not path.is_file():
        raise ModelLoadError(f"{path} is not a regular file (a pipe, device or socket)", "pass a model file")
    if not os.access(path, os.R_OK):
        raise ModelLoadError(f"model file is not readable: {path}", "check its permissions")
    return path


def _is_torchscript(path: Path) -> bool:
    try:
        with zipfile.ZipFile(path) as archive:
            return any(name.endswith("constants.pkl") or "/code/" in name for name in archive.namelist())
    except (zipfile.BadZipFile, OSError):
        return False


def load(path: str | os.PathLike[str], *, model: Any = None, trust_model: bool = False, map_location: str = "cpu",
         search_paths: Iterable[str | os.PathLike[str]] = (),
         loader: Callable[[str], Any] | None = None) -> Any:
    """Load a model file (or folder) as an ``nn.Module``.

    Reopens model-opt artifacts (replayed on ``model``, or on the architecture rebuilt from the recorded
    source with ``loader``/a safe format), torch.export ``.pt2`` programs, TorchScript, formats a plugin
    owns, Hugging Face folders and, with ``model`` given, a plain ``state_dict`` file. Whole pickled
    modules need ``trust_model=True``, or a ``loader`` (the test script's ``load_model``). Errors name the
    problem and the fix on one line.
    """
    import torch

    search_paths = list(search_paths)
    path = check_readable(path, allow_folder=True)
    if is_artifact(path):
        return load_artifact(path, model=model, trust_model=trust_model, map_location=map_location,
                             search_paths=search_paths, loader=loader, open_source=load)
    if loader is not None:
        with importable(search_paths):
            loaded = loader(str(path))
        if not isinstance(loaded, torch.nn.Module):
            raise TestScriptError(f"the test script's load_model() returned {type(loaded).__name__}, not a "
                                  "torch.nn.Module", "return the model from load_model(path)")
        return loaded
    if path.is_dir():
        return open_folder(path)
    from .plugins import get_plugin_manager

    owned = get_plugin_manager().open_model(path)
    if owned is not None:
        return owned
    if path.suffix == ".pt2":
        return _open_program(path, trust_model)
    if _is_torchscript(path):
        try:
            return torch.jit.load(str(path), map_location=map_location)
        except Exception as exc:
            raise ModelLoadError(f"{path.name} is not a TorchScript model ({first_line(exc)})",
                                 "save it with torch.jit.save, or pass another format") from None
    try:
        obj = torch.load(str(path), map_location=map_location, weights_only=True)
    except Exception as exc:
        message = str(exc)
        if "Unsupported global" not in message:
            raise ModelLoadError(
                f"{path.name} is not a PyTorch model file ({first_line(exc)})",
                "pass a file saved with torch.save, torch.export.save or torch.jit.save",
            ) from None
        if not trust_model:
            raise ModelLoadError(
                f"{path.name} is a pickled nn.Module, which runs code when loaded",
                "pass --trust-model (trust_model=True) if you trust the file, or define load_model(path) "
                "in the test script",
            ) from None
        with importable(search_paths):
            try:
                obj = torch.load(str(path), map_location=map_location, weights_only=False)
            except (ModuleNotFoundError, AttributeError) as exc:
                raise ModelLoadError(
                    f"{path.name} was pickled from code that cannot be imported here ({exc})",
                    "put the model's module beside the test script, or define load_model(path) in it",
                ) from None
        return as_module(obj, path)
    if isinstance(obj, dict):
        if model is not None:
            load_weights(model, obj, path.name)
            return model
        raise ModelLoadError(
            f"{path.name} holds weights only (a state_dict), not the architecture",
            "define load_model(path) in the test script to build the model and load them, or save the whole "
            "model (torch.save(model)) and pass --trust-model",
        )
    return as_module(obj, path)


def _open_program(path: Path, trust_model: bool) -> Any:
    """A torch.export ``.pt2``: every pickle inside is checked with the weights-only unpickler first."""
    from .exported import ExportedModule, UnsafeProgram, trusting, unsafe_program

    try:
        with quiet_torch_logs(), trusting(trust_model):
            return ExportedModule.from_bytes(read_regular(path))
    except UnsafeProgram as exc:
        raise unsafe_program(path.name, exc) from None
    except Exception as exc:
        raise ModelLoadError(f"{path.name} is not a torch.export program ({first_line(exc)})",
                             "save it with torch.export.save(program, path)") from None
