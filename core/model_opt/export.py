"""``model-opt export``: a model (the user's, or model-opt's own result) as a file the next tool opens:
a torch.export program (``.pt2``), ONNX, or OpenVINO IR.

Shapes are dynamic by default: the batch dimension of every input, and the sequence dimension of token
inputs (integer tensors of two or more dimensions); ``static=True`` fixes them to the example's. The
sample inputs saved with a program are two rows of the example (copied, never a view of the dataset).
Every export is checked against the torch model before it is written: at two batch sizes (one with static
shapes), the largest absolute difference of the outputs is reported.
"""

from __future__ import annotations

import io
import os
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .atomic import atomic_path, written_together
from .errors import BackendNotInstalled, TechniqueError, UsageError, describe
from .measure import call_model, split_input
from .modelio import open_model
from .outputs import EXPORT_SUFFIXES, check_export_output, export_target
from .testscript import TestScript, check_input_shape, example_input
from .timing import runtime_of

FORMATS = tuple(EXPORT_SUFFIXES)
#: What a format needs installed, and how to get it.
NEEDS = {"onnx": (("onnx", "onnxscript"), 'pip install "model-opt[onnx]"'),
         "openvino": (("openvino",), "pip install openvino")}
#: Formats a technique writes (:attr:`model_opt.registry.Technique.exports`) rather than an exporter of the core.
BY_TECHNIQUE = ("gguf",)


@dataclass
class ExportResult:
    format: str
    files: list[str]
    dynamic: dict[str, list[int]]
    checked: dict[int, float] = field(default_factory=dict)  # batch size -> max abs difference
    native: bool = False  # the model's own files (another runtime's), written as they are

    def render(self) -> str:
        if self.native:
            return f"exported {self.format}: {', '.join(self.files)}\n  the model's own {self.format} files, " \
                   "written as they are (its input and output names and shapes unchanged)"
        words = {0: "batch", 1: "sequence"}
        shapes = "; ".join(f"input {name}: {', '.join(words.get(d, str(d)) for d in dims)}"
                           for name, dims in self.dynamic.items()) or "none (static shapes)"
        checks = ", ".join(f"batch {b}: max abs diff {d:.2e}" for b, d in self.checked.items())
        return f"exported {self.format}: {', '.join(self.files)}\n  dynamic: {shapes}\n  checked against torch: " \
               f"{checks}"


def output_names(model: Any, example: Any) -> list[str]:
    """The field names of the model's output when it is a ``ModelOutput`` (``last_hidden_state``, ``logits``...),
    in order; else none."""
    import torch

    with torch.inference_mode():
        out = call_model(model, example)
    is_model_output = hasattr(out, "to_tuple") and callable(getattr(out, "keys", None))
    return [str(k) for k in out.keys()] if is_model_output else []


def name_outputs(ov_model: Any, names: list[str]) -> None:
    """Give an OpenVINO model's outputs the original's field names (only those), as optimum-intel's IRs have
    them, so that OpenVINO users and tools find ``logits`` or ``last_hidden_state`` by name."""
    for port, name in zip(ov_model.outputs, names, strict=False):
        port.get_tensor().set_names({name})


def check_format(name: str) -> str:
    if name not in FORMATS:
        raise UsageError(f"unknown export format {name!r}", f"choose one of: {', '.join(FORMATS)}")
    import importlib.util

    modules, hint = NEEDS.get(name, ((), ""))
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        raise BackendNotInstalled(f"exporting to {name} needs {', '.join(missing)}, which is not installed", hint)
    return name


def sample(example: Any, rows: int) -> Any:
    """``example`` with batch size ``rows`` (rows repeated as needed), copied into fresh tensors."""
    import torch

    def fit(value: Any) -> Any:
        if not isinstance(value, torch.Tensor) or value.dim() == 0:
            return value
        reps = -(-rows // value.shape[0])
        return value.repeat(reps, *([1] * (value.dim() - 1)))[:rows].clone()

    if isinstance(example, dict):
        return {k: fit(v) for k, v in example.items()}
    if isinstance(example, (tuple, list)):
        return type(example)(fit(v) for v in example)
    return fit(example)


def dynamic_dims(example: Any, static: bool) -> dict[str, list[int]]:
    """Input name (or position) -> its dynamic dimensions: batch, and sequence for token inputs."""
    import torch

    args, kwargs = split_input(example)
    named = kwargs or {str(i): v for i, v in enumerate(args)}
    if static:
        return {}
    dims = {}
    for name, value in named.items():
        if isinstance(value, torch.Tensor) and value.dim():
            tokens = not value.is_floating_point() and value.dim() >= 2
            dims[name] = [0, 1] if tokens else [0]
    return dims


def _torch_dynamic_shapes(example: Any, dims: dict[str, list[int]]) -> Any:
    import torch

    args, kwargs = split_input(example)
    # the sequence's range is the model's (position tables cap it): let export find it
    batch, seq = torch.export.Dim("batch", min=1), torch.export.Dim.AUTO

    def spec(name: str) -> Any:
        chosen = dims.get(name)
        return {d: (batch if d == 0 else seq) for d in chosen} if chosen else None

    if kwargs:
        return {k: spec(k) for k in kwargs}
    return tuple(spec(str(i)) for i in range(len(args)))


def export_file(model_path: str | os.PathLike[str], fmt: str, *, output: str | None = None,
                test_script: str | os.PathLike[str] | None = None, dataset: str | None = None,
                input_shape: Sequence[int] | None = None, static: bool = False, trust_model: bool = False,
                progress: Callable[[str], None] = lambda message: None) -> ExportResult:
    """``model-opt export``: the model (opened as every command opens it) exported in ``fmt`` to ``output`` (default:
    beside the model), with the example input every command uses; the output is checked before any work."""
    fmt = check_format(fmt)
    model_path = Path(model_path)
    out = check_export_output(export_target(model_path, fmt, output), model_path, fmt)
    check_input_shape(input_shape)  # (before the model is opened)
    script = TestScript(test_script, model_path=model_path) if test_script else None
    model = open_model(model_path, script, trust_model)
    if fmt in BY_TECHNIQUE and runtime_of(model) == "torch":
        model = _by_technique(model, fmt, model_path, progress)
    if runtime_of(model) != "torch":  # another runtime's result: its own files, no example needed
        return _export_native(model, runtime_of(model), fmt, out, progress)
    example = example_input(script, dataset, input_shape)
    if example is None:
        raise UsageError("an export needs an example input", "pass --test-script with example_input() (and "
                         "--test-dataset), or --input-shape")
    return export_model(model, example, fmt, out, static=static, progress=progress)


def export_model(model: Any, example: Any, fmt: str, path: Path, static: bool = False,
                 progress: Callable[[str], None] = lambda message: None) -> ExportResult:
    """Export ``model`` to ``path`` in format ``fmt``, verified at two batch sizes before it is written."""
    import torch

    from .exported import ExportedModule

    check_format(fmt)
    rows = check_example(example)
    runtime = runtime_of(model)
    if runtime != "torch":  # an OpenVINO result: its own IR is the export, written as it is
        return _export_native(model, runtime, fmt, path, progress)
    if isinstance(model, ExportedModule):  # a .pt2 given back: export its graph, not the wrapper's *args
        model = model.module_  # (a graph from torch.export has no train/eval switch)
    elif hasattr(model, "eval"):
        model = model.eval()
    # traced on two rows (dynamic: any batch), or on the example itself (static: the shapes it fixes)
    tiny = sample(example, rows) if static else sample(example, 2)
    dims = dynamic_dims(tiny, static)
    batches = [rows] if static else [1, 3]
    progress(f"exporting to {fmt} ({'static shapes' if static else 'dynamic ' + ', '.join(sorted(dims)) or 'static'})")
    with tempfile.TemporaryDirectory(prefix="model-opt-export-") as tmp:
        staged = Path(tmp) / f"model{EXPORT_SUFFIXES[fmt]}"
        try:
            runner = {"pt2": _pt2, "onnx": _onnx, "openvino": _openvino}[fmt](model, tiny, dims, staged)
        except (UsageError, BackendNotInstalled):
            raise
        except Exception as exc:
            raise TechniqueError(f"the model could not be exported to {fmt} ({describe(exc, 200)})",
                                 "try --static-shapes, or another format; nothing was written") from None
        result = ExportResult(fmt, [], dims)
        with torch.inference_mode():
            for size in batches:
                inputs = sample(example, size) if not static else example
                expected = _tensors(call_model(model, inputs))
                got = _tensors(runner(inputs))
                if len(got) != len(expected) or any(a.shape != b.shape for a, b in zip(got, expected, strict=False)):
                    raise TechniqueError(f"the {fmt} export gives outputs of other shapes than the model at batch "
                                         f"{size}", "try --static-shapes; nothing was written")
                result.checked[size] = max((float((a.float() - b.float()).abs().max()) for a, b in
                                            zip(got, expected, strict=True) if a.numel()), default=0.0)
        result.files = _put_in_place(staged, fmt, path)
    return result


def _put_in_place(staged: Path, fmt: str, path: Path) -> list[str]:
    """The staged export's files written to ``path`` (and its ``.bin``), atomically and together."""
    targets = [path, *([path.with_suffix(".bin")] if fmt == "openvino" else [])]
    sources = [staged, *([staged.with_suffix(".bin")] if fmt == "openvino" else [])]
    with written_together():
        for source, target in zip(sources, targets, strict=True):
            data = source.read_bytes()
            if fmt == "openvino" and target.suffix == ".xml":
                data = data.replace(staged.with_suffix(".bin").name.encode(), path.with_suffix(".bin").name.encode())
            with atomic_path(target) as out:
                out.write_bytes(data)
    return [str(t) for t in targets]


def _export_native(model: Any, runtime: str, fmt: str, path: Path, progress: Callable[[str], None]) -> ExportResult:
    """A model that runs in another runtime (an OpenVINO result): its own files, as they are, when the format is
    that runtime's; any other format is a one-line error (there is no torch graph to export)."""
    save_native = getattr(model, "save_native", None)
    if fmt != getattr(model, "native_format", runtime) or not callable(save_native):
        own = getattr(model, "native_format", runtime)
        raise UsageError(f"this model runs in {runtime}, not torch, so it cannot be exported to {fmt}",
                         f"use --format {own} (its own files, as they are), or export the torch model it was "
                         "made from")
    progress(f"writing the model's own {runtime} files")
    with tempfile.TemporaryDirectory(prefix="model-opt-export-") as tmp:
        staged = Path(tmp) / f"model{EXPORT_SUFFIXES[fmt]}"
        save_native(staged)
        result = ExportResult(fmt, _put_in_place(staged, fmt, path), {}, native=True)
    return result


def _by_technique(model: Any, fmt: str, model_path: Path, progress: Callable[[str], None]) -> Any:
    """The model made by the installed technique that writes ``fmt`` (applied with the options it declares for the
    export); none installed is a one-line error with the install command."""
    from .context import TechniqueContext
    from .plugins import get_plugin_manager

    manager = get_plugin_manager()
    found = [t for t in manager.registry.techniques.values() if fmt in t.exports]
    if not found:
        raise BackendNotInstalled(f"exporting to {fmt} needs the plugin that writes it, which is not installed",
                                  'pip install "model-opt[all]" (model-opt techniques lists what is installed)')
    technique = found[0]
    technique.validate_environment()
    options = technique.resolve_options(technique.exports[fmt])
    progress(f"writing {fmt} with {technique.label} ({', '.join(f'{k}={v}' for k, v in options.items())})")
    context = TechniqueContext(model_path=str(model_path), progress=progress, technique=technique.label)
    return manager.apply(technique, model, options, context).model


def check_example(example: Any) -> int:
    """The example's batch size; an example holding no tensor, or an empty batch, is a one-line error."""
    import torch

    args, kwargs = split_input(example)
    tensors = [v for v in [*args, *kwargs.values()] if isinstance(v, torch.Tensor) and v.dim()]
    if not tensors:
        raise UsageError("the example input holds no tensor with a batch dimension, so there is nothing to trace",
                         "return tensors from example_input() (a tensor, a tuple or a dict of them), or pass "
                         "--input-shape")
    rows = int(tensors[0].shape[0])
    if rows < 1:
        raise UsageError("the example input has an empty batch (0 rows)", "return at least one row from "
                         "example_input(), or pass --input-shape with a batch of 1 or more")
    return rows


def _tensors(output: Any) -> list[Any]:
    """Every tensor in a model output (tensor, tuple, dict, ModelOutput), in order."""
    import torch

    if isinstance(output, torch.Tensor):
        return [output]
    if isinstance(output, dict) or hasattr(output, "to_tuple"):
        output = output.to_tuple() if hasattr(output, "to_tuple") else tuple(output.values())
    if isinstance(output, (tuple, list)):
        return [t for item in output for t in _tensors(item)]
    return []


def _pt2(model: Any, tiny: Any, dims: dict[str, list[int]], path: Path) -> Callable[[Any], Any]:
    import torch

    args, kwargs = split_input(tiny)
    program = torch.export.export(model, args, kwargs or None,
                                  dynamic_shapes=_torch_dynamic_shapes(tiny, dims) if dims else None)
    buffer = io.BytesIO()  # (a file name would become the archive's root folder)
    torch.export.save(program, buffer)
    path.write_bytes(buffer.getvalue())
    module = program.module()
    return lambda inputs: call_model(module, inputs)


def _onnx(model: Any, tiny: Any, dims: dict[str, list[int]], path: Path) -> Callable[[Any], Any]:
    import torch

    args, kwargs = split_input(tiny)
    program = torch.onnx.export(model, args, kwargs=kwargs or None, dynamo=True, external_data=False,
                                dynamic_shapes=_torch_dynamic_shapes(tiny, dims) if dims else None)
    program.save(str(path))
    names = [i.name for i in program.model.graph.inputs]
    try:
        import onnxruntime as ort
    except ImportError:  # checked with the exported program's own reference run instead
        return lambda inputs: program(*_positional(inputs, names))
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])

    def run(inputs: Any) -> Any:
        feed = dict(zip(names, (t.numpy() for t in _positional(inputs, names)), strict=False))
        return [torch.from_numpy(o) for o in session.run(None, feed)]
    return run


def _positional(inputs: Any, names: list[str]) -> list[Any]:
    args, kwargs = split_input(inputs)
    return [*args, *(kwargs[n] for n in names[len(args):] if n in kwargs)]


def _openvino(model: Any, tiny: Any, dims: dict[str, list[int]], path: Path) -> Callable[[Any], Any]:
    import torch

    from .telemetry import backend_telemetry_off

    backend_telemetry_off()  # (before OpenVINO's converter is imported: it sends an event on import)
    import openvino as ov

    args, kwargs = split_input(tiny)
    if isinstance(model, torch.fx.GraphModule):  # a graph from a .pt2: OpenVINO reads torch.export programs
        source: Any = torch.export.export(model, tuple(args), kwargs or None,
                                          dynamic_shapes=_torch_dynamic_shapes(tiny, dims) if dims else None)
        converted = ov.convert_model(source)
    else:
        converted = ov.convert_model(model, example_input=kwargs or tuple(args))
        name_outputs(converted, output_names(model, tiny))
    shapes = {}
    for index, port in enumerate(converted.inputs):
        name = port.get_any_name()
        value = kwargs.get(name) if kwargs else (args[index] if index < len(args) else None)
        if not isinstance(value, torch.Tensor):
            continue
        chosen = dims.get(name if kwargs else str(index), [])
        shapes[port] = ov.PartialShape([-1 if d in chosen else s for d, s in enumerate(value.shape)])
    if shapes:
        converted.reshape(shapes)
    ov.save_model(converted, str(path), compress_to_fp16=False)
    compiled = ov.Core().compile_model(ov.Core().read_model(str(path)), "CPU")
    names = [p.get_any_name() for p in compiled.inputs]

    def run(inputs: Any) -> Any:
        a, k = split_input(inputs)
        feed = {**dict(zip(names, (t.numpy() for t in a), strict=False)), **{n: v.numpy() for n, v in k.items()}}
        result = compiled(feed)
        return [torch.from_numpy(result[out].copy()) for out in compiled.outputs]
    return run
