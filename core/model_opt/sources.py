"""What the user gives model-opt to read: a model path (or a Hub id in the local cache), folders and files read
only when they are regular files and within bounds, and the import path while a model loads."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from .errors import ModelLoadError, first_line

#: Whether the working directory is importable while a model loads (not in worker processes).
_WORKING_DIRECTORY_IMPORTABLE = [True]


def isolate_from_working_directory() -> None:
    """In a worker process: nothing in the working directory is importable, now or while models load."""
    _WORKING_DIRECTORY_IMPORTABLE[0] = False
    here = os.getcwd()
    sys.path[:] = [p for p in sys.path if p not in ("", ".") and os.path.abspath(p) != here]


@contextlib.contextmanager
def importable(paths: Iterable[str | os.PathLike[str]]) -> Iterator[None]:
    """Put ``paths`` (then the working directory, except in worker processes) on sys.path while loading a model,
    in that order of priority: the first folder given wins over the later ones and over everything already on
    sys.path."""
    added = []
    working = [os.getcwd()] if _WORKING_DIRECTORY_IMPORTABLE[0] else []
    for path in reversed([*map(str, paths), *working]):
        if path and os.path.isdir(path):
            with contextlib.suppress(ValueError):
                sys.path.remove(path)
            sys.path.insert(0, path)
            added.append(path)
    try:
        yield
    finally:
        for path in added:
            with contextlib.suppress(ValueError):
                sys.path.remove(path)


@contextlib.contextmanager
def quiet_torch_logs() -> Iterator[None]:
    """torch logs its own tracebacks when a damaged .pt2 fails to load; our one-line error says it."""
    logger = logging.getLogger("torch")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)


#: The largest JSON file (config, recipe) read from a model folder or artifact.
MAX_JSON_BYTES = 16 * 2**20


def regular_file(path: Path) -> Path:
    """``path``, when it is a regular file (links followed): a pipe or a device would block or never end."""
    try:
        info = os.stat(path)
    except OSError as exc:
        raise ModelLoadError(f"cannot read {path.name} ({exc.strerror or exc})", "check the file") from None
    _check_regular(info, path)
    return path


def _check_regular(info: os.stat_result, path: Path) -> None:
    """A one-line error unless ``info`` (of ``path``) is a regular file's."""
    import stat

    if not stat.S_ISREG(info.st_mode):
        raise ModelLoadError(f"{path.name} is not a regular file (a pipe, a device, or a link to one)",
                             "replace it with the real file")


def read_regular(path: str | os.PathLike[str], limit: int | None = None) -> bytes:
    """The bytes of a regular file. A pipe, a device or a link to one (which would never end, or block on open) is
    a one-line error, as is a file over ``limit`` bytes."""
    path = Path(path)
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except OSError as exc:
        raise ModelLoadError(f"cannot read {path.name} ({exc.strerror or exc})", "check the file") from None
    with os.fdopen(fd, "rb") as handle:
        info = os.fstat(handle.fileno())
        _check_regular(info, path)
        if limit is not None and info.st_size > limit:
            raise ModelLoadError(f"{path.name} is {info.st_size:,} bytes, more than the {limit:,} such a file may "
                                 "have", "check the file; it is not what model-opt wrote")
        return handle.read()


def check_regular_files(folder: Path) -> None:
    """Every file inside ``folder`` (links followed) is a regular file: a pipe or a device (or a link to one) would
    hang or never end when a loader or a copy reads it."""
    for entry in sorted(folder.rglob("*")):
        if entry.is_dir() or entry.is_file():
            continue
        if entry.is_symlink() and not entry.exists():  # a dangling link: nothing to read
            continue
        raise ModelLoadError(f"{entry.relative_to(folder)} in {folder.name} is not a regular file (a pipe, a "
                             "device, or a link to one)", f"remove it from {folder.name}")


def read_config(folder: Path) -> dict[str, Any]:
    """A model folder's ``config.json`` as a mapping, read within bounds; else a one-line error."""
    data = read_regular(folder / "config.json", MAX_JSON_BYTES)
    try:
        config = json.loads(data)
    except (ValueError, RecursionError) as exc:
        raise ModelLoadError(f"{folder.name}/config.json is not valid JSON ({first_line(exc)[:100]})",
                             "fix or replace the config") from None
    if not isinstance(config, dict):
        raise ModelLoadError(f"{folder.name}/config.json holds a {type(config).__name__}, not a mapping",
                             "fix or replace the config")
    return config


def resolve_model_path(path: str | os.PathLike[str]) -> Path:
    """``path``, or for a Hugging Face Hub id that is not a path here, its folder in the local cache."""
    path = Path(path)
    if path.exists():
        return path
    return hub_snapshot(str(path)) or path


def hub_snapshot(name: str) -> Path | None:
    """The local folder of a Hugging Face Hub id (``org/model``) from the Hugging Face cache (no download);
    None when ``name`` does not look like one. An id that is not cached is a one-line error saying how to get it."""
    import re

    if not re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", name) or name.endswith((".pt", ".pth", ".pt2", ".xml")):
        return None
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        return None
    try:
        return Path(snapshot_download(name, local_files_only=True))
    except Exception:
        raise ModelLoadError(f"{name} is neither a file here nor a Hugging Face model in the local cache",
                             f"download it first (hf download {name}), or pass the path of its folder") from None


def as_module(obj: Any, path: Path) -> Any:
    """``obj`` when it is a ``torch.nn.Module``; else a one-line error saying what to save instead."""
    import torch

    if isinstance(obj, torch.nn.Module):
        return obj
    raise ModelLoadError(
        f"{path.name} holds a {type(obj).__name__}, not a torch.nn.Module",
        "save the model itself (torch.save(model)), a torch.export .pt2, or define load_model(path) "
        "in the test script",
    )
