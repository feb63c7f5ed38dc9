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

A folder output holds the same recipe as ``model_opt.json`` beside files the ecosystem opens: the weights
as ``model.safetensors`` (``weights.pt`` for tensor types safetensors cannot hold), or the runtime's own
files written by the model's ``save_native(folder)`` (OpenVINO: ``openvino_model.xml/.bin``); the Hugging
Face ``config.json`` (updated for pruned shapes) and the input folder's tokenizer/processor files.
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

from .atomic import atomic_folder, atomic_path
from .errors import ModelLoadError, ModelOptError, UsageError, first_line, printable

MANIFEST = "model_opt.json"
WEIGHTS = "weights.pt"
SAFETENSORS = "model.safetensors"
PICKLE = "model.pt"
#: Files of an input folder that are not copied into a folder output (weights and configs are written anew).
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".onnx", ".xml", ".pt2",
                   ".gguf", ".ot", ".index")
FORMAT_VERSION = 2
#: Source flag: the model's transformers Conv1D layers were replaced by nn.Linear before any step (replayed).
CONV1D_AS_LINEAR = "conv1d_as_linear"
#: Attribute under which the seed API records the steps applied to a model, for :func:`save`.
STEPS_ATTR = "_model_opt_steps"


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


def read_regular(path: str | os.PathLike[str], limit: int | None = None) -> bytes:
    """The bytes of a regular file. A pipe, a device or a link to one (which would never end, or block on open) is
    a one-line error, as is a file over ``limit`` bytes."""
    import stat

    path = Path(path)
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except OSError as exc:
        raise ModelLoadError(f"cannot read {path.name} ({exc.strerror or exc})", "check the file") from None
    with os.fdopen(fd, "rb") as handle:
        info = os.fstat(handle.fileno())
        if not stat.S_ISREG(info.st_mode):
            raise ModelLoadError(f"{path.name} is not a regular file (a pipe, a device, or a link to one)",
                                 "replace it with the real file")
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


def is_causal_lm(config: dict[str, Any]) -> bool:
    """A decoder-only language model, from its Hugging Face config: its architecture ends in ForCausalLM or
    LMHeadModel."""
    architectures = config.get("architectures") or []
    return any(str(a).endswith(("ForCausalLM", "LMHeadModel")) for a in architectures) \
        and not config.get("is_encoder_decoder", False)


def _auto_class(config: dict[str, Any]) -> Any:
    import transformers

    return transformers.AutoModelForCausalLM if is_causal_lm(config) else transformers.AutoModel


def _transformers(where: str) -> None:
    try:
        import transformers  # noqa: F401
    except ImportError:
        raise ModelLoadError(f"{where} is a Hugging Face model folder, and transformers is not installed",
                             "pip install transformers, or define load_model(path) in the test script") from None


def _open_folder(path: Path) -> Any:
    """A Hugging Face model folder (config.json) through transformers, without remote code: causal LMs with
    their LM head (AutoModelForCausalLM), others with AutoModel."""
    if not (path / "config.json").is_file():
        raise ModelLoadError(f"{path} is a folder without config.json, so no loader knows it",
                             "pass the model file itself, or define load_model(path) in the test script")
    _transformers(str(path))
    config = read_config(path)
    check_regular_files(path)
    try:
        with quiet_torch_logs():
            model = _auto_class(config).from_pretrained(str(path), local_files_only=True, trust_remote_code=False)
    except Exception as exc:
        raise ModelLoadError(f"transformers could not open {path.name} ({type(exc).__name__}: "
                             f"{first_line(exc)})", "define load_model(path) in the test script") from None
    return model.eval()


#: How much larger (in float bytes) than its saved weights a recorded architecture may be: pruning and 4-bit
#: packing together shrink a model by up to about this much.
MAX_ARCHITECTURE_RATIO = 128


def from_config(config: dict[str, Any], name: str, weights: dict[str, Any] | None = None) -> Any:
    """The architecture a Hugging Face config describes (random weights: the saved ones are loaded after). With
    the saved ``weights``, the config is checked against them first: its layer counts against the layers the
    weights hold, then its size, built on the meta device, against theirs; a recipe that asks for far more than
    the weights hold is refused before anything is allocated."""
    _transformers(name)
    import transformers

    if weights is not None:
        check_layer_counts(config, weights, name)
    try:
        values = {k: v for k, v in config.items() if k != "model_type"}
        hf_config = transformers.AutoConfig.for_model(config["model_type"], **values)
        if weights is not None:
            check_size(hf_config, config, weights, name)
        with quiet_torch_logs():
            return _auto_class(config).from_config(hf_config, trust_remote_code=False).eval()
    except ModelOptError:
        raise
    except Exception as exc:
        raise ModelLoadError(f"{name}: transformers could not rebuild the recorded architecture "
                             f"({type(exc).__name__}: {first_line(exc)})",
                             "pass model=<the original architecture>") from None


#: Config fields that count a model's layers (transformers' names across architectures).
LAYER_COUNTS = ("num_hidden_layers", "n_layer", "n_layers", "num_layers", "encoder_layers", "decoder_layers",
                "num_encoder_layers", "num_decoder_layers")


def check_layer_counts(config: dict[str, Any], weights: dict[str, Any], name: str) -> None:
    """A config's layer counts (``num_hidden_layers``, ``n_layer``, ...) may not exceed the longest list of
    numbered modules the saved weights hold (``model.layers.<i>.``)."""
    longest: dict[str, int] = {}
    for key in weights:
        parts = str(key).split(".")
        for index, part in enumerate(parts[:-1]):
            if part.isdigit():
                prefix = ".".join(parts[:index])
                longest[prefix] = max(longest.get(prefix, 0), int(part) + 1)
    if not longest:
        return
    held = max(longest.values())
    for key, value in config.items():
        if key in LAYER_COUNTS and isinstance(value, int) and not isinstance(value, bool) and value > held:
            raise ModelLoadError(f"{name}: the recipe's config asks for {key}={value}, and the saved weights hold "
                                 f"{held} layers", "re-create the file with model-opt optimize; it was altered")


def check_size(hf_config: Any, config: dict[str, Any], weights: dict[str, Any], name: str) -> None:
    """The recorded architecture, built on the meta device, may not need far more memory than the saved weights
    (:data:`MAX_ARCHITECTURE_RATIO`, plus 1 GiB for small models)."""
    import torch

    def nbytes(tensor: Any) -> int:
        try:
            return tensor.numel() * tensor.element_size()
        except Exception:  # a quantized tensor type: at least a byte an element
            return tensor.numel()

    saved = sum(nbytes(v) for v in weights.values() if isinstance(v, torch.Tensor))
    with torch.device("meta"), quiet_torch_logs():
        built = _auto_class(config).from_config(hf_config, trust_remote_code=False)
    needed = sum(p.numel() * 4 for p in built.parameters())
    if needed > MAX_ARCHITECTURE_RATIO * saved + 2**30:
        raise ModelLoadError(f"{name}: the recipe's config describes a model of {needed / 2**30:.1f} GiB, and the "
                             f"saved weights are {saved / 2**20:.1f} MiB",
                             "re-create the file with model-opt optimize; it was altered")


# -- artifacts ------------------------------------------------------------------------------------


def load_artifact(path: Path, *, model: Any = None, trust_model: bool = False, map_location: str = "cpu",
                  search_paths: Iterable[str | os.PathLike[str]] = (),
                  loader: Callable[[str], Any] | None = None) -> Any:
    """Reopen a model-opt artifact: replay the recipe on the base architecture, or (trusted) unpickle."""
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
        if start is not None:  # that step's weights hold the whole model: no architecture needed
            base, steps = None, steps[start:]
        elif model is not None:
            base = model
        else:
            base = base_model(manifest, path, trust_model=trust_model, map_location=map_location,
                              search_paths=search_paths, loader=loader, weights=weights)
        source = manifest.get("source") if isinstance(manifest.get("source"), dict) else {}
        if base is not None and source.get(CONV1D_AS_LINEAR):
            from .modules import linear_from_conv1d

            linear_from_conv1d(base)
        rebuilt = replay(base, steps, map_location)
        if weights is None:
            _load_native(rebuilt, path)
        else:
            if stored.endswith(".safetensors"):  # it keeps one name of tensors shared by several
                weights = with_shared(rebuilt, weights)
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


def read_weights(path: Path, stored: str, map_location: str = "cpu") -> dict[str, Any]:
    """An artifact's state_dict, read without running code: safetensors, or ``torch.load(weights_only=True)``."""
    import torch

    try:
        if stored.endswith(".safetensors"):
            from safetensors.torch import load as load_safetensors

            weights = load_safetensors(read_member(path, stored))
        else:
            weights = torch.load(io.BytesIO(read_member(path, stored)), map_location=map_location, weights_only=True)
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
    for names in groups.values():
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
               weights: dict[str, Any] | None = None) -> Any:
    """The original architecture, opened from the source the manifest records, by the same safe rules (a
    recorded config is checked against the saved ``weights`` before it is built)."""
    source = manifest.get("source")
    where = source.get("path") if isinstance(source, dict) else None
    if not isinstance(where, str) or not where:
        raise ModelLoadError(f"{path.name} records no source model to rebuild the architecture from",
                             "pass model=<the original architecture> (model_opt.load(path, model=...))")
    src = Path(where)
    if source.get("opened_with") == "folder" and isinstance(source.get("config"), dict):
        return from_config(source["config"], path.name, weights)  # the folder need not be there any more
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


def import_backends(steps: list[dict[str, Any]]) -> None:
    """Import the packages the recorded steps' techniques require (each checked as installed first): torchao, for
    one, registers its quantized tensor types as safe for ``weights_only`` loading when it is imported."""
    import importlib

    from .plugins import get_plugin_manager

    manager = get_plugin_manager()
    for step in steps:
        technique = manager.registry.find(step["kind"], step["backend"], step["method"])
        technique.validate_environment()
        for package in technique.requires:
            importlib.import_module(package)


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
    from .exported import UnsafeProgram, trusting

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


def recipe(model: Any, manifest: dict[str, Any] | None) -> tuple[dict[str, Any], list[str]]:
    """The manifest of an artifact (format, versions, ``manifest``'s fields, the steps: given, or those the seed
    API recorded on ``model``), and the steps that cannot be replayed (which make it a pickled model)."""
    import torch

    import model_opt

    if manifest is not None and not isinstance(manifest, dict):
        raise UsageError(f"manifest is a {type(manifest).__name__}, not a mapping",
                         "pass manifest={'source': ..., 'steps': [...]} or leave it out")
    meta: dict[str, Any] = {"format": "model-opt", "format_version": FORMAT_VERSION, "torch": torch.__version__,
                            "model_opt": model_opt.__version__, **(manifest or {})}
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


def hf_config(model: Any) -> Any:
    """The Hugging Face config of the model, or of the one Hugging Face model inside it; else None."""
    configs = [getattr(m, "config", None) for m in ([model, *model.modules()] if hasattr(model, "modules")
                                                     else [model])]
    found = [c for c in configs if callable(getattr(c, "save_pretrained", None))]
    unique = list({id(c): c for c in found}.values())
    if unique and (unique[0] is getattr(model, "config", None) or len(unique) == 1):
        return unique[0]
    return None


def transformers_note(model: Any) -> str | None:
    """Why ``transformers`` cannot open a folder output of ``model`` on its own (None when it can): the model is
    not a plain Hugging Face model, or its config cannot express the optimized shapes (checked by building the
    architecture from the config on the meta device and comparing every weight's shape)."""
    import torch

    config = getattr(model, "config", None)
    if not callable(getattr(config, "save_pretrained", None)) or not hasattr(type(model), "_from_config"):
        return "it is not a plain Hugging Face model (model_opt.load opens it)"
    try:
        with torch.device("meta"), quiet_torch_logs():
            built = type(model)._from_config(config)
        expected = {k: tuple(v.shape) for k, v in built.state_dict().items()}
    except Exception as exc:
        return f"its config cannot describe the result ({first_line(exc, 160)}); model_opt.load opens it"
    actual = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    differ = [k for k in actual if k in expected and expected[k] != actual[k]]
    if differ or set(actual) - set(expected):
        name = (differ or sorted(set(actual) - set(expected)))[0]
        return f"its config cannot describe the optimized layers ({name}); model_opt.load opens it"
    dtypes = sorted({str(p.dtype).replace("torch.", "") for p in model.parameters() if p.is_floating_point()})
    if len(dtypes) > 1:
        return (f"its weights mix {' and '.join(dtypes)}, and from_pretrained casts every weight to one dtype; "
                "model_opt.load opens it")
    return None


def weights_dtype(model: Any) -> Any:
    """The one floating dtype of ``model``'s parameters, or None (none, or several)."""
    dtypes = {p.dtype for p in model.parameters() if p.is_floating_point()}
    return dtypes.pop() if len(dtypes) == 1 else None


def copyable_files(source: Path) -> tuple[list[Path], list[str]]:
    """The input folder's files that a folder output copies as they are (tokenizer, processor, generation config,
    sentence-transformers modules: not weights, the config or a recipe, which are written anew, nor hidden files),
    and those left out, each with why: not a regular file, or a link that leads outside the folder (outside its
    repository's folder for a Hugging Face cache snapshot, whose files are links into ``blobs/``)."""
    roots = [source.resolve()]
    if source.parent.name == "snapshots":
        roots.append(source.parent.parent.resolve())
    files, skipped = [], []
    for entry in sorted(source.rglob("*")):
        relative = entry.relative_to(source)
        if relative.parts[0].startswith(".") or entry.suffix.lower() in WEIGHT_SUFFIXES or \
                relative.as_posix() in ("config.json", MANIFEST) or (entry.is_dir() and not entry.is_symlink()):
            continue
        target = entry.resolve()
        if not any(root == target or root in target.parents for root in roots):
            skipped.append(f"{relative.as_posix()} (a link to a file outside the model folder)")
        elif entry.is_dir():
            continue
        elif not entry.is_file():
            skipped.append(f"{relative.as_posix()} (not a regular file)")
        else:
            files.append(entry)
    return files, skipped


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
