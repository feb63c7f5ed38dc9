"""Write a model-opt artifact atomically: a zip (recipe + weights) or a folder the ecosystem opens (recipe,
safetensors or the runtime's own files, the Hugging Face config, the input folder's tokenizer files)."""

from __future__ import annotations

import io
import json
import os
import zipfile
from pathlib import Path
from typing import Any

from ..atomic import atomic_folder, atomic_path
from ..errors import ModelOptError, UsageError, first_line, printable
from ..hf import copyable_files, hf_config, transformers_note, weights_dtype
from ..sources import MAX_JSON_BYTES, read_regular
from ..version import __version__
from .format import FORMAT_VERSION, MANIFEST, PICKLE, SAFETENSORS, STEPS_ATTR, WEIGHTS, is_artifact, read_manifest


def recipe(model: Any, manifest: dict[str, Any] | None) -> tuple[dict[str, Any], list[str]]:
    """The manifest of an artifact (format, versions, ``manifest``'s fields, the steps: given, or those the seed
    API recorded on ``model``), and the steps that cannot be replayed (which make it a pickled model)."""
    import torch

    if manifest is not None and not isinstance(manifest, dict):
        raise UsageError(f"manifest is a {type(manifest).__name__}, not a mapping",
                         "pass manifest={'source': ..., 'steps': [...]} or leave it out")
    meta: dict[str, Any] = {"format": "model-opt", "format_version": FORMAT_VERSION, "torch": torch.__version__,
                            "model_opt": __version__, **(manifest or {})}
    steps = meta.get("steps", getattr(model, STEPS_ATTR, []))
    if not isinstance(steps, (list, tuple)):
        raise UsageError(f"manifest steps are a {type(steps).__name__}, not a list",
                         "pass the steps as a list of step records, or leave them out")
    for index, step in enumerate(steps):
        if not (isinstance(step, dict) and all(isinstance(step.get(k), str) for k in ("kind", "backend", "method"))):
            raise UsageError(f"manifest step {index} is not a step record (a mapping with kind, backend and method)",
                             "pass the records model-opt made (report.steps), or leave the steps out")
    steps = list(steps)
    meta["steps"] = steps
    blockers = [f"{s['kind']}:{s['backend']}:{s['method']}" for s in steps if not s.get("replayable", False)]
    if not blockers and not _json_ok([s.get("state", {}) for s in steps]):
        blockers = ["a step whose state is not JSON"]
    return meta, blockers


def save(model: Any, path: str | os.PathLike[str], manifest: dict[str, Any] | None = None) -> Path:
    """Write a model-opt artifact atomically: the recipe plus the weights (or a pickled model when a step
    cannot be replayed). ``manifest`` may give ``source`` and ``steps``; without ``steps`` the steps the
    seed API recorded on ``model`` are used."""
    import torch

    meta, blockers = recipe(model, manifest)
    buffer = io.BytesIO()
    try:
        if blockers:
            meta["payload"] = "pickle"
            meta["pickled_because"] = (f"holds a pickled model ({', '.join(blockers)} cannot be replayed: its "
                                       "plugin has no restore hook)")
            torch.save(model, buffer)
        else:
            meta["payload"] = "weights"
            torch.save(model.state_dict(), buffer)
    except Exception as exc:  # a patched class made on the fly, an open handle...: nothing is written
        raise ModelOptError(f"the optimized model cannot be saved ({type(exc).__name__}: "
                            f"{first_line(exc)})", "report this to the plugin that produced it; nothing "
                            "was written") from None
    path = Path(path)
    check_replaceable(path)
    with atomic_path(path) as tmp:
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED) as archive:
            archive.writestr(MANIFEST, json.dumps(meta, indent=2, default=str))
            archive.writestr(PICKLE if blockers else WEIGHTS, buffer.getvalue())
    return path


def save_folder(model: Any, folder: str | os.PathLike[str], manifest: dict[str, Any] | None = None,
                copy_from: Path | None = None) -> Path:
    """Write a folder output atomically: the recipe (``model_opt.json``), the weights as safetensors (or the
    runtime's own files), the Hugging Face config of the result, and ``copy_from``'s other files (tokenizer,
    processor, generation config) copied as they are."""
    import shutil

    folder = Path(folder)
    check_replaceable_folder(folder)
    meta, blockers = recipe(model, {"layout": "folder", **(manifest or {})})
    if blockers:  # a folder is for what replays; the pickled fallback stays a single file
        raise ModelOptError(f"{', '.join(blockers)} cannot be replayed (its plugin has no restore hook), so the "
                            "result cannot be a folder", "pass an --output file path (.pt)")
    with atomic_folder(folder) as tmp:
        if copy_from is not None and copy_from.is_dir():
            for entry in copyable_files(copy_from)[0]:
                relative = entry.relative_to(copy_from)
                (tmp / relative).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(entry, tmp / relative)
        meta["payload"] = "weights"
        meta["weights"] = _write_weights(model, tmp)
        config = hf_config(model)
        if config is not None:
            import copy

            config = copy.copy(config)  # the result's own config: pruned shapes, and the weights' own dtype
            dtype = weights_dtype(model)
            if dtype is not None and getattr(config, "dtype", None) not in (None, dtype):
                config.dtype = dtype  # (from_pretrained would cast the weights to the config's dtype)
            config.save_pretrained(tmp)
            if "transformers" not in meta:  # (a caller that already checked passes its answer)
                note = transformers_note(model)
                meta["transformers"] = {"opens": note is None, "why_not": note}
        elif copy_from is not None and (copy_from / "config.json").is_file():  # another runtime: the model's kind
            (tmp / "config.json").write_bytes(read_regular(copy_from / "config.json", MAX_JSON_BYTES))
        meta["contents"] = sorted({*folder_contents(tmp), MANIFEST})  # a rerun replaces these, and nothing else
        (tmp / MANIFEST).write_text(json.dumps(meta, indent=2, default=str))
    return folder


def _write_weights(model: Any, folder: Path) -> str:
    """The weights into ``folder``: the runtime's own files, else safetensors, else ``weights.pt``; returns
    which (``native`` or the file name)."""
    import torch

    native = getattr(model, "save_native", None)
    if callable(native):
        native(folder)
        return "native"
    state = model.state_dict()
    try:
        if all(type(v) is torch.Tensor for v in state.values()):
            from safetensors.torch import save_model

            save_model(model, str(folder / SAFETENSORS), metadata={"format": "pt"}, force_contiguous=True)
            return SAFETENSORS
        torch.save(state, folder / WEIGHTS)
    except Exception as exc:
        raise ModelOptError(f"the optimized model cannot be saved ({type(exc).__name__}: {first_line(exc)})",
                            "report this to the plugin that produced it; nothing was written") from None
    return WEIGHTS


def folder_contents(folder: Path) -> list[str]:
    """Every file inside ``folder``, as relative paths."""
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file() or p.is_symlink())


def check_replaceable_folder(folder: Path) -> None:
    """A folder output may be new, empty, or an earlier model-opt folder holding only the files that run wrote
    (its recipe lists them); never a file, a link, or a folder holding anything else of the user's."""
    if folder.is_symlink() or (folder.exists() and not folder.is_dir()):
        raise UsageError(f"{folder} exists and is not a folder", "choose another output folder")
    if not folder.is_dir() or not any(folder.iterdir()):
        return
    if not is_artifact(folder):
        raise UsageError(f"{folder} is a folder with other files, not a model-opt output",
                         "choose a new or empty output folder")
    try:
        written = read_manifest(folder).get("contents")
    except ModelOptError:
        written = None
    if not isinstance(written, list):
        raise UsageError(f"{folder} was written by an older model-opt, which did not list its files, so files of "
                         "yours in it cannot be told apart", "choose a new output folder, or remove this one yourself")
    others = [name for name in folder_contents(folder) if name not in written]
    if others:
        raise UsageError(f"{folder} holds {printable(others[0], 80)}, which model-opt did not write there, and the "
                         "output folder is replaced whole", f"move {printable(others[0], 80)} out of the folder, or "
                         "choose another output folder")


def check_replaceable(path: Path) -> None:
    """An output path may be new, or an earlier model-opt artifact; never a pipe, a device, a folder, a link or
    another file of the user's."""
    if path.is_symlink() or (path.exists() and not path.is_file()):
        raise UsageError(f"{path} exists and is not a regular file (a folder, link, pipe or device)",
                         "save to a new file path")
    if path.exists() and not is_artifact(path):
        raise UsageError(f"{path.name} exists and is not a model-opt artifact, so saving would destroy it",
                         "save to a new file path, or remove the file yourself")


def _json_ok(value: Any) -> bool:
    try:
        json.dumps(value, allow_nan=False)
    except (TypeError, ValueError):
        return False
    return True
