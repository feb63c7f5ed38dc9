"""Load user models safely, and save/reload model-opt's own artifacts.

Input files are read with ``torch.load(weights_only=True)``, as a torch.export ``.pt2`` program or
as TorchScript. A whole pickled ``nn.Module`` runs code when unpickled, so it is loaded only with
``trust_model=True`` (``--trust-model``) or through the test script's own ``load_model``.

A model-opt artifact is a zip file with two members: ``model_opt.json`` (the manifest: the steps
applied, versions, import paths) and ``model.pt`` (``torch.save`` of the optimized module). It is
written atomically and reopened with :func:`load`.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import sys
import zipfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

from .atomic import atomic_path
from .errors import ModelLoadError, ModelOptError

MANIFEST = "model_opt.json"
PAYLOAD = "model.pt"
FORMAT_VERSION = 1


@contextlib.contextmanager
def importable(paths: Iterable[str | os.PathLike[str]]) -> Iterator[None]:
    """Put ``paths`` (and the working directory) on sys.path while loading a model."""
    added = []
    for path in [*map(str, paths), os.getcwd()]:
        if path and os.path.isdir(path) and path not in sys.path:
            sys.path.insert(0, path)
            added.append(path)
    try:
        yield
    finally:
        for path in added:
            with contextlib.suppress(ValueError):
                sys.path.remove(path)


def check_readable(path: str | os.PathLike[str]) -> Path:
    path = Path(path)
    if not path.exists():
        raise ModelLoadError(f"model file not found: {path}", "check the path")
    if path.is_dir():
        raise ModelLoadError(f"{path} is a folder, not a model file", "pass the model file itself")
    if not os.access(path, os.R_OK):
        raise ModelLoadError(f"model file is not readable: {path}", "check its permissions")
    return path


def is_artifact(path: str | os.PathLike[str]) -> bool:
    try:
        with zipfile.ZipFile(path) as archive:
            return MANIFEST in archive.namelist()
    except (zipfile.BadZipFile, OSError):
        return False


def read_manifest(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The manifest of a model-opt artifact, read without unpickling anything."""
    with zipfile.ZipFile(path) as archive:
        return json.loads(archive.read(MANIFEST))


def _is_torchscript(path: Path) -> bool:
    try:
        with zipfile.ZipFile(path) as archive:
            return any(name.endswith("constants.pkl") or "/code/" in name for name in archive.namelist())
    except (zipfile.BadZipFile, OSError):
        return False


def _as_module(obj: Any, path: Path) -> Any:
    import torch

    if isinstance(obj, torch.nn.Module):
        return obj
    raise ModelLoadError(
        f"{path.name} holds a {type(obj).__name__}, not a torch.nn.Module",
        "save the model itself (torch.save(model)), a torch.export .pt2, or define load_model(path) "
        "in the test script",
    )


def load(path: str | os.PathLike[str], *, trust_model: bool = False, map_location: str = "cpu",
         search_paths: Iterable[str | os.PathLike[str]] = (),
         loader: Callable[[str], Any] | None = None) -> Any:
    """Load a model file as an ``nn.Module``.

    Reopens model-opt artifacts (written by ``model-opt optimize`` or :func:`save`), torch.export
    ``.pt2`` programs and TorchScript files. Whole pickled modules need ``trust_model=True``, or a
    ``loader`` (the test script's ``load_model``). Errors name the problem and the fix.
    """
    import torch

    path = check_readable(path)
    if not is_artifact(path) and loader is None:
        from .plugins import get_plugin_manager

        owned = get_plugin_manager().pm.hook.load_model(path=path)
        if owned is not None:
            return owned
    if is_artifact(path):
        manifest = read_manifest(path)
        with zipfile.ZipFile(path) as archive:
            payload = io.BytesIO(archive.read(PAYLOAD))
        with importable([*manifest.get("import_paths", []), *map(str, search_paths)]):
            try:
                model = torch.load(payload, map_location=map_location, weights_only=False)
            except (ModuleNotFoundError, AttributeError) as exc:
                raise ModelLoadError(
                    f"{path.name} needs the model's code, which cannot be imported here ({exc})",
                    "run from the folder of your model code, or pass search_paths=[that folder]",
                ) from None
        return _as_module(model, path)
    if loader is not None:
        with importable(search_paths):
            return _as_module(loader(str(path)), path)
    if path.suffix == ".pt2":
        try:
            return torch.export.load(str(path)).module()
        except Exception as exc:
            raise ModelLoadError(f"{path.name} is not a torch.export program ({_first_line(exc)})",
                                 "save it with torch.export.save(program, path)") from None
    if _is_torchscript(path):
        return torch.jit.load(str(path), map_location=map_location)
    try:
        obj = torch.load(str(path), map_location=map_location, weights_only=True)
    except Exception as exc:
        message = str(exc)
        if "Unsupported global" not in message:
            raise ModelLoadError(
                f"{path.name} is not a PyTorch model file ({_first_line(exc)})",
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
        return _as_module(obj, path)
    if isinstance(obj, dict):
        raise ModelLoadError(
            f"{path.name} holds weights only (a state_dict), not the architecture",
            "define load_model(path) in the test script to build the model and load them, or save the whole "
            "model (torch.save(model)) and pass --trust-model",
        )
    return _as_module(obj, path)


def save(model: Any, path: str | os.PathLike[str], manifest: dict[str, Any] | None = None) -> Path:
    """Write a model-opt artifact atomically: the manifest plus ``torch.save(model)``."""
    import torch

    buffer = io.BytesIO()
    try:
        torch.save(model, buffer)
    except Exception as exc:  # a patched class made on the fly, an open handle...: nothing is written
        raise ModelOptError(f"the optimized model cannot be saved ({type(exc).__name__}: "
                            f"{_first_line(exc)})", "report this to the plugin that produced it; nothing "
                            "was written") from None
    meta = {"format": "model-opt", "format_version": FORMAT_VERSION, "torch": torch.__version__,
            **(manifest or {})}
    path = Path(path)
    with atomic_path(path) as tmp:
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED) as archive:
            archive.writestr(MANIFEST, json.dumps(meta, indent=2, default=str))
            archive.writestr(PAYLOAD, buffer.getvalue())
    return path


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:200] if text else type(exc).__name__
