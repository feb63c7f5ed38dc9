"""The model-opt artifact's format: its member files, its recipe (``model_opt.json``), read without running
anything."""

from __future__ import annotations

import json
import os
import zipfile
from pathlib import Path
from typing import Any

from ..errors import ModelLoadError, ModelOptError, first_line
from ..sources import read_regular

MANIFEST = "model_opt.json"
WEIGHTS = "weights.pt"
SAFETENSORS = "model.safetensors"
PICKLE = "model.pt"
FORMAT_VERSION = 2
#: Source flag: the model's transformers Conv1D layers were replaced by nn.Linear before any step (replayed).
CONV1D_AS_LINEAR = "conv1d_as_linear"
#: Attribute under which the seed API records the steps applied to a model, for :func:`model_opt.save`.
STEPS_ATTR = "_model_opt_steps"


def is_artifact(path: str | os.PathLike[str]) -> bool:
    """A model-opt artifact: a file (zip) or a folder output, each holding ``model_opt.json``."""
    if Path(path).is_dir():
        return (Path(path) / MANIFEST).is_file()
    try:
        with zipfile.ZipFile(path) as archive:
            return MANIFEST in archive.namelist()
    except (zipfile.BadZipFile, OSError):
        return False


def artifact_names(path: Path) -> set[str]:
    """The names of the files inside an artifact (a folder's files, or the zip's members)."""
    if path.is_dir():
        return {p.name for p in path.iterdir() if p.is_file()}
    with zipfile.ZipFile(path) as archive:
        return set(archive.namelist())


def read_member(path: Path, name: str) -> bytes:
    """One file of an artifact (folder or zip)."""
    if path.is_dir():
        return read_regular(path / name)
    with zipfile.ZipFile(path) as archive:
        return archive.read(name)


def read_manifest(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The manifest of a model-opt artifact, read without unpickling anything."""
    path = Path(path)
    try:
        manifest = json.loads(read_member(path, MANIFEST))
    except ModelLoadError as exc:
        raise ModelLoadError(f"{path.name} has a model-opt manifest that cannot be read ({exc.problem})",
                             "re-create the file with model-opt optimize") from None
    except (zipfile.BadZipFile, KeyError, OSError, ValueError, RecursionError) as exc:
        raise ModelLoadError(f"{path.name} has a damaged model-opt manifest ({first_line(exc)[:120]})",
                             "re-create the file with model-opt optimize") from None
    if not isinstance(manifest, dict):
        raise ModelLoadError(f"{path.name} has a model-opt manifest that is a {type(manifest).__name__}, "
                             "not a mapping", "re-create the file with model-opt optimize")
    return manifest


def source_path(path: str | os.PathLike[str]) -> str:
    """The MODEL a run was given: for a model-opt artifact, the source its recipe records (the test script's hooks
    get it as ``model_path``, e.g. to open the tokenizer of the original folder); else ``path`` itself."""
    try:
        if is_artifact(path):
            source = read_manifest(path).get("source")
            where = source.get("path") if isinstance(source, dict) else None
            if isinstance(where, str) and where:
                return where
    except (ModelOptError, OSError):
        pass
    return os.fspath(path)


def recorded_steps(manifest: dict[str, Any], name: str) -> list[dict[str, Any]]:
    """The manifest's steps, each checked for the fields a replay reads."""
    steps = manifest.get("steps", [])
    if not isinstance(steps, list):
        raise ModelLoadError(f"{name}: the manifest's steps are a {type(steps).__name__}, not a list",
                             "re-create the file with model-opt optimize")
    for index, step in enumerate(steps):
        ok = isinstance(step, dict) and all(isinstance(step.get(k), str) for k in ("kind", "backend", "method")) \
            and isinstance(step.get("options", {}), dict) and isinstance(step.get("state", {}), dict)
        if not ok:
            raise ModelLoadError(f"{name}: step {index} of the manifest is malformed",
                                 "re-create the file with model-opt optimize")
    return steps
