"""Reopen a model-opt artifact: the recipe replayed on the original architecture, then the saved weights loaded
(``weights_only``/safetensors); a pickled payload only when the user trusts the file."""

from __future__ import annotations

import importlib
import io
import os
import zipfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from ..errors import ModelLoadError, ModelOptError, first_line, printable
from ..hf import from_config
from ..sources import as_module, importable, regular_file
from .format import (
    CONV1D_AS_LINEAR,
    FORMAT_VERSION,
    PICKLE,
    WEIGHTS,
    artifact_names,
    is_artifact,
    read_manifest,
    read_member,
    recorded_steps,
)


def load_artifact(path: Path, *, model: Any = None, trust_model: bool = False, map_location: str = "cpu",
                  search_paths: Iterable[str | os.PathLike[str]] = (), loader: Callable[[str], Any] | None = None,
                  open_source: Callable[..., Any] | None = None) -> Any:
    """Reopen a model-opt artifact: replay the recipe on the base architecture, or (trusted) unpickle.
    ``open_source`` opens the source model the recipe names (``model_opt.modelio.load``: by the same safe
    rules as any model)."""
    import torch

    manifest = read_manifest(path)
    version = manifest.get("format_version")
    names = artifact_names(path)
    if version == FORMAT_VERSION and manifest.get("payload") == "weights":
        steps = recorded_steps(manifest, path.name)
        stored = manifest.get("weights", WEIGHTS)
        if not isinstance(stored, str) or (stored != "native" and stored not in names):
            what = f"{stored} is missing" if isinstance(stored, str) else "the recipe names no weights file"
            raise ModelLoadError(f"{path.name} has no weights ({printable(what, 80)})",
                                 "re-create the file with model-opt optimize")
        # read first: the recorded architecture is checked against them before it is built (the steps' backends
        # imported before: some register their tensor types as safe for weights-only loading when imported)
        import_backends(steps)
        weights = None if stored == "native" else read_weights(path, stored, map_location)
        start = max((i for i, step in enumerate(steps) if step.get("standalone")), default=None)

        def rebuild(lean: bool) -> Any:
            if start is not None:  # that step's weights hold the whole model: no architecture needed
                return _replayed(None, manifest, steps[start:], weights, path, trust_model, map_location)
            base = model if model is not None else base_model(
                manifest, path, trust_model=trust_model, map_location=map_location, search_paths=search_paths,
                loader=loader, weights=weights, open_source=open_source, lean=lean)
            return _replayed(base, manifest, steps, weights, path, trust_model, map_location)

        if start is None and model is None and builds_from_config(manifest):
            try:  # the architecture without its float weights: the saved ones are assigned to it
                rebuilt = rebuild(lean=True)
                if not on_meta(rebuilt):
                    return rebuilt.eval() if hasattr(rebuilt, "eval") else rebuilt
            except Exception:  # a step that cannot be replayed on shapes alone: built in full below
                pass
        rebuilt = rebuild(lean=False)
        return rebuilt.eval() if hasattr(rebuilt, "eval") else rebuilt
    if isinstance(version, int) and version > FORMAT_VERSION:
        raise ModelLoadError(f"{path.name} was written by a newer model-opt (format {version})",
                             "upgrade model-opt (pip install -U model-opt)")
    why = ("was written by model-opt format 1, which pickles the whole model" if version in (None, 1) else
           printable(str(manifest.get("pickled_because") or "holds a pickled model"), 200))
    if not trust_model:
        raise ModelLoadError(f"{path.name} {why}; reopening it runs code from the file",
                             "pass --trust-model (trust_model=True) only if you trust where the file came from")
    if PICKLE not in names:
        raise ModelLoadError(f"{path.name} has no model payload ({PICKLE} is missing)",
                             "re-create the file with model-opt optimize")
    paths = manifest.get("import_paths", [])
    if not (isinstance(paths, list) and all(isinstance(p, str) for p in paths)):
        raise ModelLoadError(f"{path.name}: the manifest's import_paths are not a list of folders",
                             "re-create the file with model-opt optimize")
    with zipfile.ZipFile(path) as archive:
        payload = io.BytesIO(archive.read(PICKLE))
    with importable([*paths, *map(str, search_paths)]):
        try:
            obj = torch.load(payload, map_location=map_location, weights_only=False)
        except (ModuleNotFoundError, AttributeError) as exc:
            raise ModelLoadError(
                f"{path.name} needs the model's code, which cannot be imported here ({exc})",
                "run from the folder of your model code, or pass search_paths=[that folder]",
            ) from None
        except Exception as exc:
            raise ModelLoadError(f"the model payload of {path.name} is damaged ({first_line(exc)})",
                                 "re-create the file with model-opt optimize") from None
    return as_module(obj, path)


def _replayed(base: Any, manifest: dict[str, Any], steps: list[dict[str, Any]], weights: dict[str, Any] | None,
              path: Path, trust_model: bool, map_location: str) -> Any:
    """``base`` with the recorded steps replayed and the saved weights (or the runtime's own files) loaded."""
    source = manifest.get("source") if isinstance(manifest.get("source"), dict) else {}
    if base is not None and source.get(CONV1D_AS_LINEAR):
        from ..modules import linear_from_conv1d

        linear_from_conv1d(base)
    rebuilt = replay(base, steps, map_location)
    if weights is None:
        _load_native(rebuilt, path)
    else:
        if manifest.get("weights", WEIGHTS).endswith(".safetensors"):  # it keeps one name of tensors shared
            weights = with_shared(rebuilt, weights)
        load_weights(rebuilt, weights, path.name, trust_model)
    return rebuilt


def builds_from_config(manifest: dict[str, Any]) -> bool:
    """The recipe rebuilds its architecture from the Hugging Face config it records."""
    source = manifest.get("source")
    return isinstance(source, dict) and source.get("opened_with") == "folder" and isinstance(source.get("config"),
                                                                                              dict)


def on_meta(model: Any) -> bool:
    """Some parameter or buffer of ``model`` has no data (it is still on the meta device)."""
    import itertools

    if not (hasattr(model, "parameters") and hasattr(model, "buffers")):
        return False
    return any(t.device.type == "meta" for t in itertools.chain(model.parameters(), model.buffers()))


def read_weights(path: Path, stored: str, map_location: str = "cpu") -> dict[str, Any]:
    """An artifact's state_dict, read without running code: safetensors, or ``torch.load(weights_only=True)``. A
    folder's file is mapped, not read into memory first: the tensors are its pages."""
    import torch

    try:
        if path.is_dir():
            file = str(regular_file(path / stored))
            if stored.endswith(".safetensors"):
                from safetensors.torch import load_file

                weights = load_file(file, device=map_location)
            else:
                weights = torch.load(file, map_location=map_location, weights_only=True, mmap=True)
        elif stored.endswith(".safetensors"):
            from safetensors.torch import load as load_safetensors

            weights = load_safetensors(read_member(path, stored))
        else:
            weights = torch.load(io.BytesIO(read_member(path, stored)), map_location=map_location, weights_only=True)
    except ModelOptError:
        raise
    except Exception as exc:
        raise ModelLoadError(f"the weights in {path.name} are damaged or not plain tensors "
                             f"({first_line(exc)})", "re-create the file with model-opt optimize") from None
    if not isinstance(weights, dict):
        raise ModelLoadError(f"the weights in {path.name} are a {type(weights).__name__}, not a state_dict",
                             "re-create the file with model-opt optimize")
    return weights


def with_shared(model: Any, weights: dict[str, Any]) -> dict[str, Any]:
    """``weights`` with the names safetensors left out because they share one tensor with another (tied input and
    output embeddings) filled in from the name it kept, as the model ties them."""
    try:
        state = model.state_dict()
    except Exception:  # a module that holds nothing yet
        return weights
    groups: dict[tuple[int, int, tuple[int, ...]], list[str]] = {}
    for name, tensor in state.items():
        if getattr(tensor, "device", None) is not None and tensor.device.type != "meta" and type(tensor).__name__ in (
                "Tensor", "Parameter"):
            key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape))
            groups.setdefault(key, []).append(name)
    filled = dict(weights)
    for names in [*groups.values(), *tied_parameters(model)]:  # (tied parameters on the meta device: by identity)
        kept = next((n for n in names if n in weights), None)
        for name in names if kept is not None and len(names) > 1 else ():
            filled.setdefault(name, weights[kept])
    return filled


def _load_native(model: Any, folder: Path) -> None:
    """A folder whose weights are a runtime's own files: the replayed module reads them (``load_native``)."""
    load_native = getattr(model, "load_native", None)
    if not callable(load_native):
        raise ModelLoadError(f"{folder.name} holds its model in a runtime's own files, and the replayed "
                             f"{type(model).__name__} cannot read them", "install the plugin that wrote the folder")
    try:
        load_native(folder)
    except ModelOptError:
        raise
    except Exception as exc:
        raise ModelLoadError(f"the model files in {folder.name} are damaged ({first_line(exc)})",
                             "re-create the folder with model-opt optimize") from None


def base_model(manifest: dict[str, Any], path: Path, *, trust_model: bool, map_location: str,
               search_paths: Iterable[str | os.PathLike[str]], loader: Callable[[str], Any] | None,
               weights: dict[str, Any] | None = None, open_source: Callable[..., Any] | None = None,
               lean: bool = False) -> Any:
    """The original architecture, opened from the source the manifest records, by the same safe rules (a
    recorded config is checked against the saved ``weights`` before it is built; ``lean``: its parameters on the
    meta device)."""
    source = manifest.get("source")
    where = source.get("path") if isinstance(source, dict) else None
    if not isinstance(where, str) or not where:
        raise ModelLoadError(f"{path.name} records no source model to rebuild the architecture from",
                             "pass model=<the original architecture> (model_opt.load(path, model=...))")
    src = Path(where)
    if source.get("opened_with") == "folder" and isinstance(source.get("config"), dict):
        return from_config(source["config"], path.name, weights, empty=lean)  # the folder need not be there any more
    if source.get("opened_with") == "load_model" and loader is None:
        raise ModelLoadError(f"{path.name} was made from {src.name}, which the test script's load_model() opens",
                             "pass --test-script (CLI), or test_script=... or model=... to model_opt.load")
    if not src.exists():
        raise ModelLoadError(f"{path.name} was made from {src}, which is not there to rebuild the architecture",
                             "pass model=<the original architecture>, or put the source model back")
    if src.resolve() == path.resolve() or (src.is_file() and is_artifact(src)) or open_source is None:
        raise ModelLoadError(f"{path.name} names another model-opt artifact as its source",
                             "pass model=<the original architecture>")
    try:
        return open_source(src, trust_model=trust_model, map_location=map_location, search_paths=search_paths,
                    loader=loader)
    except ModelLoadError as exc:
        if "is a pickled nn.Module" not in str(exc):
            raise
        raise ModelLoadError(f"{path.name} was made from {src.name}, a pickled nn.Module, which runs code when "
                             "loaded", "pass the architecture: model_opt.load(path, model=YourModel()) (safe), or "
                             "--test-script with load_model(); --trust-model only if you trust the source") from None


def import_backends(steps: list[dict[str, Any]]) -> None:
    """Import the packages the recorded steps' techniques require (each checked as installed first): torchao, for
    one, registers its quantized tensor types as safe for ``weights_only`` loading when it is imported."""
    from ..plugins import get_plugin_manager

    manager = get_plugin_manager()
    for step in steps:
        technique = manager.registry.find(step["kind"], step["backend"], step["method"])
        technique.validate_environment()
        for package in technique.requires:
            importlib.import_module(package)


def replay(model: Any, steps: list[dict[str, Any]], device: str = "cpu") -> Any:
    """Rebuild each recorded step on ``model`` through the ``restore`` hook of the plugin that made it."""
    from ..context import TechniqueContext
    from ..plugins import get_plugin_manager

    manager = get_plugin_manager()
    context = TechniqueContext(device=device)
    for step in steps:
        technique = manager.registry.find(step["kind"], step["backend"], step["method"])
        if not manager.can_restore(technique):
            raise ModelLoadError(f"plugin {technique.plugin!r} cannot replay {technique.name} (no restore hook)",
                                 "upgrade the plugin, or re-create the file")
        try:
            model = manager.restore(technique, model, dict(step.get("options", {})), dict(step.get("state", {})),
                                    context)
        except ModelOptError:
            raise
        except Exception as exc:
            raise ModelLoadError(f"{technique.name} could not be replayed on this architecture "
                                 f"({type(exc).__name__}: {first_line(exc)})",
                                 "pass model= with the architecture the artifact was made from") from None
    return model


def tied_parameters(model: Any) -> list[list[str]]:
    """Names that share one Parameter in ``model`` (tied input and output embeddings), in groups."""
    groups: dict[int, list[str]] = {}
    named = getattr(model, "named_parameters", None)
    for name, parameter in named(remove_duplicate=False) if callable(named) else ():
        groups.setdefault(id(parameter), []).append(name)
    return [names for names in groups.values() if len(names) > 1]


def load_weights(model: Any, weights: dict[str, Any], name: str, trust_model: bool = False) -> None:
    """Load a state_dict into ``model`` (shapes must match; tensors are taken over, not copied). A program
    held as weights (a standalone step) is checked like a ``.pt2`` unless ``trust_model``."""
    from ..exported import UnsafeProgram, trusting, unsafe_program

    tied = tied_parameters(model)
    try:
        with trusting(trust_model):
            model.load_state_dict(weights, strict=True, assign=True)
        for names in tied:  # assign=True gives each name a Parameter of its own: tie them again
            first = model.get_parameter(names[0])
            for name in names[1:]:
                owner, _, attr = name.rpartition(".")
                setattr(model.get_submodule(owner) if owner else model, attr, first)
    except UnsafeProgram as exc:
        raise unsafe_program(name, exc) from None
    except Exception as exc:
        detail = " ".join(str(exc).split())
        detail = detail.split(":", 1)[1].strip() if detail.startswith("Error(s) in loading") else detail
        raise ModelLoadError(f"the weights in {name} do not fit the model ({detail[:300]})",
                             "pass model= with the architecture the file was made from") from None
