"""Load user models safely, and save/reopen model-opt's own artifacts.

Input files are read with ``torch.load(weights_only=True)``, as a torch.export ``.pt2`` program, as
TorchScript, or by a plugin's ``load_model`` hook (OpenVINO IR). A whole pickled ``nn.Module`` runs
code when unpickled, so it is loaded only with ``trust_model=True`` (``--trust-model``) or through the
test script's own ``load_model``.

A model-opt artifact (format 2) is a zip file holding ``model_opt.json`` (the recipe: where the
original model came from and every step applied, with the options and the JSON state that replays it)
and ``weights.pt`` (the optimized model's ``state_dict``, plain tensors and torchao's safe tensor
types). Reopening builds the original architecture (``model=``, the test script's ``load_model``, or
the recorded source file opened safely), replays each step through its plugin's ``restore`` hook and
loads the weights with ``weights_only=True``: nothing in the file is executed. A step whose plugin has
no ``restore`` hook is saved as a pickled model (``model.pt``) instead, and such a file, like a format 1
artifact, reopens only with ``trust_model=True``.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import sys
import zipfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

from .atomic import atomic_path
from .errors import ModelLoadError, ModelOptError, UsageError, first_line, printable

MANIFEST = "model_opt.json"
WEIGHTS = "weights.pt"
PICKLE = "model.pt"
FORMAT_VERSION = 2
#: Attribute under which the seed API records the steps applied to a model, for :func:`save`.
STEPS_ATTR = "_model_opt_steps"


@contextlib.contextmanager
def importable(paths: Iterable[str | os.PathLike[str]]) -> Iterator[None]:
    """Put ``paths`` (then the working directory) on sys.path while loading a model, in that order of
    priority: the first folder given wins over the later ones and over everything already on sys.path."""
    added = []
    for path in reversed([*map(str, paths), os.getcwd()]):
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


def check_readable(path: str | os.PathLike[str], allow_folder: bool = False) -> Path:
    """The path of a readable model file (or folder, where a loader can open one); else a one-line error."""
    path = Path(path)
    if not path.exists():
        raise ModelLoadError(f"model file not found: {path}", "check the path")
    if path.is_dir():
        if not allow_folder:
            raise ModelLoadError(f"{path} is a folder, not a model file",
                                 "pass the model file itself, or define load_model(path) in the test script")
    elif not path.is_file():
        raise ModelLoadError(f"{path} is not a regular file (a pipe, device or socket)", "pass a model file")
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
    path = Path(path)
    try:
        with zipfile.ZipFile(path) as archive:
            manifest = json.loads(archive.read(MANIFEST))
    except (zipfile.BadZipFile, KeyError, OSError, ValueError, RecursionError) as exc:
        raise ModelLoadError(f"{path.name} has a damaged model-opt manifest ({first_line(exc)[:120]})",
                             "re-create the file with model-opt optimize") from None
    if not isinstance(manifest, dict):
        raise ModelLoadError(f"{path.name} has a model-opt manifest that is a {type(manifest).__name__}, "
                             "not a mapping", "re-create the file with model-opt optimize")
    return manifest


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
                             search_paths=search_paths, loader=loader)
    if loader is not None:
        with importable(search_paths):
            loaded = loader(str(path))
        if not isinstance(loaded, torch.nn.Module):
            from .errors import TestScriptError

            raise TestScriptError(f"the test script's load_model() returned {type(loaded).__name__}, not a "
                                  "torch.nn.Module", "return the model from load_model(path)")
        return loaded
    if path.is_dir():
        return _open_folder(path)
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
        return _as_module(obj, path)
    if isinstance(obj, dict):
        if model is not None:
            load_weights(model, obj, path.name)
            return model
        raise ModelLoadError(
            f"{path.name} holds weights only (a state_dict), not the architecture",
            "define load_model(path) in the test script to build the model and load them, or save the whole "
            "model (torch.save(model)) and pass --trust-model",
        )
    return _as_module(obj, path)


def _open_program(path: Path, trust_model: bool) -> Any:
    """A torch.export ``.pt2``: every pickle inside is checked with the weights-only unpickler first."""
    from .exported import ExportedModule, UnsafeProgram, trusting

    try:
        with quiet_torch_logs(), trusting(trust_model):
            return ExportedModule.from_bytes(path.read_bytes())
    except UnsafeProgram as exc:
        raise unsafe_program(path.name, exc) from None
    except Exception as exc:
        raise ModelLoadError(f"{path.name} is not a torch.export program ({first_line(exc)})",
                             "save it with torch.export.save(program, path)") from None


def unsafe_program(name: str, exc: BaseException) -> ModelLoadError:
    return ModelLoadError(f"{name} cannot be opened safely: {first_line(exc)}; torch.export.load would run code "
                          "from it", "pass --trust-model (trust_model=True) only if you trust where the file came "
                          "from")


def _open_folder(path: Path) -> Any:
    """A Hugging Face model folder (config.json) through transformers' AutoModel, without remote code."""
    if not (path / "config.json").is_file():
        raise ModelLoadError(f"{path} is a folder without config.json, so no loader knows it",
                             "pass the model file itself, or define load_model(path) in the test script")
    try:
        import transformers
    except ImportError:
        raise ModelLoadError(f"{path} is a Hugging Face model folder, and transformers is not installed",
                             "pip install transformers, or define load_model(path) in the test script") from None
    try:
        with quiet_torch_logs():
            model = transformers.AutoModel.from_pretrained(str(path), local_files_only=True,
                                                           trust_remote_code=False)
    except Exception as exc:
        raise ModelLoadError(f"transformers could not open {path.name} ({type(exc).__name__}: "
                             f"{first_line(exc)})", "define load_model(path) in the test script") from None
    return model.eval()


# -- artifacts ------------------------------------------------------------------------------------


def load_artifact(path: Path, *, model: Any = None, trust_model: bool = False, map_location: str = "cpu",
                  search_paths: Iterable[str | os.PathLike[str]] = (),
                  loader: Callable[[str], Any] | None = None) -> Any:
    """Reopen a model-opt artifact: replay the recipe on the base architecture, or (trusted) unpickle."""
    import torch

    manifest = read_manifest(path)
    version = manifest.get("format_version")
    with zipfile.ZipFile(path) as archive:
        names = set(archive.namelist())
    if version == FORMAT_VERSION and manifest.get("payload") == "weights":
        steps = recorded_steps(manifest, path.name)
        if WEIGHTS not in names:
            raise ModelLoadError(f"{path.name} has no weights ({WEIGHTS} is missing)",
                                 "re-create the file with model-opt optimize")
        start = max((i for i, step in enumerate(steps) if step.get("standalone")), default=None)
        if start is not None:  # that step's weights hold the whole model: no architecture needed
            base, steps = None, steps[start:]
        elif model is not None:
            base = model
        else:
            base = base_model(manifest, path, trust_model=trust_model, map_location=map_location,
                              search_paths=search_paths, loader=loader)
        rebuilt = replay(base, steps, map_location)
        try:
            with zipfile.ZipFile(path) as archive:
                weights = torch.load(io.BytesIO(archive.read(WEIGHTS)), map_location=map_location,
                                     weights_only=True)
        except Exception as exc:
            raise ModelLoadError(f"the weights in {path.name} are damaged or not plain tensors "
                                 f"({first_line(exc)})", "re-create the file with model-opt optimize") from None
        if not isinstance(weights, dict):
            raise ModelLoadError(f"the weights in {path.name} are a {type(weights).__name__}, not a state_dict",
                                 "re-create the file with model-opt optimize")
        load_weights(rebuilt, weights, path.name, trust_model)
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
    return _as_module(obj, path)


def base_model(manifest: dict[str, Any], path: Path, *, trust_model: bool, map_location: str,
               search_paths: Iterable[str | os.PathLike[str]], loader: Callable[[str], Any] | None) -> Any:
    """The original architecture, opened from the source the manifest records, by the same safe rules."""
    source = manifest.get("source")
    where = source.get("path") if isinstance(source, dict) else None
    if not isinstance(where, str) or not where:
        raise ModelLoadError(f"{path.name} records no source model to rebuild the architecture from",
                             "pass model=<the original architecture> (model_opt.load(path, model=...))")
    src = Path(where)
    if source.get("opened_with") == "load_model" and loader is None:
        raise ModelLoadError(f"{path.name} was made from {src.name}, which the test script's load_model() opens",
                             "pass --test-script (CLI), or test_script=... or model=... to model_opt.load")
    if not src.exists():
        raise ModelLoadError(f"{path.name} was made from {src}, which is not there to rebuild the architecture",
                             "pass model=<the original architecture>, or put the source model back")
    if src.resolve() == path.resolve() or (src.is_file() and is_artifact(src)):
        raise ModelLoadError(f"{path.name} names another model-opt artifact as its source",
                             "pass model=<the original architecture>")
    try:
        return load(src, trust_model=trust_model, map_location=map_location, search_paths=search_paths,
                    loader=loader)
    except ModelLoadError as exc:
        if "is a pickled nn.Module" not in str(exc):
            raise
        raise ModelLoadError(f"{path.name} was made from {src.name}, a pickled nn.Module, which runs code when "
                             "loaded", "pass the architecture: model_opt.load(path, model=YourModel()) (safe), or "
                             "--test-script with load_model(); --trust-model only if you trust the source") from None


def replay(model: Any, steps: list[dict[str, Any]], device: str = "cpu") -> Any:
    """Rebuild each recorded step on ``model`` through the ``restore`` hook of the plugin that made it."""
    from .context import TechniqueContext
    from .plugins import get_plugin_manager

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


def load_weights(model: Any, weights: dict[str, Any], name: str, trust_model: bool = False) -> None:
    """Load a state_dict into ``model`` (shapes must match; tensors are taken over, not copied). A program
    held as weights (a standalone step) is checked like a ``.pt2`` unless ``trust_model``."""
    from .exported import UnsafeProgram, trusting

    try:
        with trusting(trust_model):
            model.load_state_dict(weights, strict=True, assign=True)
    except UnsafeProgram as exc:
        raise unsafe_program(name, exc) from None
    except Exception as exc:
        detail = " ".join(str(exc).split())
        detail = detail.split(":", 1)[1].strip() if detail.startswith("Error(s) in loading") else detail
        raise ModelLoadError(f"the weights in {name} do not fit the model ({detail[:300]})",
                             "pass model= with the architecture the file was made from") from None


def save(model: Any, path: str | os.PathLike[str], manifest: dict[str, Any] | None = None) -> Path:
    """Write a model-opt artifact atomically: the recipe plus the weights (or a pickled model when a step
    cannot be replayed). ``manifest`` may give ``source`` and ``steps``; without ``steps`` the steps the
    seed API recorded on ``model`` are used."""
    import torch

    import model_opt

    meta: dict[str, Any] = {"format": "model-opt", "format_version": FORMAT_VERSION, "torch": torch.__version__,
                            "model_opt": model_opt.__version__, **(manifest or {})}
    steps = list(meta.get("steps", getattr(model, STEPS_ATTR, [])))
    meta["steps"] = steps
    blockers = [f"{s['kind']}:{s['backend']}:{s['method']}" for s in steps if not s.get("replayable", False)]
    if not blockers and not _json_ok([s.get("state", {}) for s in steps]):
        blockers = ["a step whose state is not JSON"]
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
