"""Hugging Face models: folders opened without remote code, architectures rebuilt from a recorded config (checked
against the saved weights first), configs of results, and what a folder output copies."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

from .artifact.format import MANIFEST
from .errors import ModelLoadError, ModelOptError, first_line
from .sources import check_regular_files, quiet_torch_logs, read_config

#: Files of an input folder that are not copied into a folder output (weights and configs are written anew).
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".onnx", ".xml", ".pt2",
                   ".gguf", ".ot", ".index")


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


def open_folder(path: Path) -> Any:
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


@contextmanager
def parameters_on_meta() -> Iterator[None]:
    """Modules built inside hold their parameters on the meta device (shapes, no memory, no initialisation
    work): ``torch.empty`` without a device (how layers allocate their weights) gives meta tensors, and any other
    parameter moves there when it is registered. Buffers made otherwise stay real, so those a model computes rather
    than saves (rotary frequencies, position ids) are there once the saved weights are assigned."""
    import torch

    register_parameter, empty = torch.nn.Module.register_parameter, torch.empty

    def register(module: torch.nn.Module, name: str, param: Any) -> None:
        if param is not None and param.device.type != "meta":
            param = type(param)(param.to("meta"), requires_grad=param.requires_grad)
        register_parameter(module, name, param)

    def meta_empty(*args: Any, **kwargs: Any) -> Any:
        if kwargs.get("device") is None:
            kwargs["device"] = "meta"
        return empty(*args, **kwargs)

    torch.nn.Module.register_parameter, torch.empty = register, meta_empty  # type: ignore[method-assign,assignment]
    try:
        yield
    finally:
        torch.nn.Module.register_parameter, torch.empty = register_parameter, empty  # type: ignore[method-assign]


def from_config(config: dict[str, Any], name: str, weights: dict[str, Any] | None = None, *,
                empty: bool = False) -> Any:
    """The architecture a Hugging Face config describes (random weights: the saved ones are loaded after;
    ``empty``: parameters on the meta device, for weights assigned after). With the saved ``weights``, the config
    is checked against them first: its layer counts against the layers the weights hold, then its size, built
    on the meta device, against theirs; a recipe that asks for far more than the weights hold is refused before
    anything is allocated."""
    _transformers(name)
    import transformers

    if weights is not None:
        check_layer_counts(config, weights, name)
    try:
        values = {k: v for k, v in config.items() if k != "model_type"}
        hf_config = transformers.AutoConfig.for_model(config["model_type"], **values)
        if weights is not None:
            check_size(hf_config, config, weights, name)
        with quiet_torch_logs(), parameters_on_meta() if empty else nullcontext():
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
