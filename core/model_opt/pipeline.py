"""The optimize pipeline: load, measure, apply techniques in a fixed order, measure, save."""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import modelio
from .atomic import write_text_atomic
from .context import TechniqueContext, model_input
from .errors import AccuracyBudgetExceeded, DeviceError, ModelOptError, TechniqueError, UsageError
from .hookspecs import KINDS
from .measure import compile_model, count_flops, count_parameters, model_latency, state_dict_bytes, to_device
from .modelinfo import run_checked
from .plugins import PluginManager, get_plugin_manager
from .registry import Technique
from .report import Measurement, Report, StepRecord
from .testscript import TestScript

#: Combined techniques always run in this order.
ORDER: tuple[str, ...] = KINDS


@dataclass
class Step:
    """One requested technique: kind plus optional backend/method names and raw option values."""

    kind: str
    backend: str | None = None
    method: str | None = None
    options: dict[str, Any] = field(default_factory=dict)


def plan(steps: Sequence[Step], manager: PluginManager | None = None) -> list[tuple[Technique, dict[str, Any]]]:
    """Resolve and validate every step (no model needed), sorted into pipeline order."""
    manager = manager or get_plugin_manager()
    resolved = []
    for step in sorted(steps, key=lambda s: ORDER.index(s.kind) if s.kind in ORDER else -1):
        technique = manager.registry.find(step.kind, step.backend, step.method)
        options = technique.resolve_options(step.options)
        technique.validate_environment()
        resolved.append((technique, options))
    return resolved


def check_device(device: str) -> str:
    import torch

    if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        raise UsageError(f"unknown device {device!r}", "choose one of: cpu, cuda")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise DeviceError("--device cuda was asked for, but no CUDA GPU is available here", "use --device cpu")
    return device


def apply(model: Any, planned: Sequence[tuple[Technique, dict[str, Any]]], context: TechniqueContext,
          manager: PluginManager | None = None) -> tuple[Any, list[StepRecord]]:
    """Apply each planned technique through its plugin; return the model and step records."""
    manager = manager or get_plugin_manager()
    records = []
    for technique, options in planned:
        check_needs(technique, context)
        context.progress(f"applying {technique.kind} {technique.backend}:{technique.method}")
        started = time.perf_counter()
        try:
            model, info = manager.apply(technique, model, options, context)
        except ModelOptError:
            raise
        except Exception as exc:  # a backend's own error: one line, unless debugging
            if os.environ.get("MODEL_OPT_DEBUG"):
                raise
            raise TechniqueError(f"{technique.backend} {technique.method} failed on this model "
                                 f"({type(exc).__name__}: {_first_line(exc)})",
                                 "the input is untouched; set MODEL_OPT_DEBUG=1 to see the traceback") from None
        records.append(StepRecord(technique.kind, technique.backend, technique.method, technique.plugin,
                                  options, info, time.perf_counter() - started))
    unchanged = [r for r in records if r.info.get("changed") is False]
    if records and len(unchanged) == len(records):
        notes = "; ".join(f"{r.backend} {r.method}: {r.info.get('note', 'no change')}" for r in unchanged)
        raise TechniqueError(f"nothing was optimized ({notes})", "choose a technique or setting that applies "
                             "to this model (see model-opt techniques)")
    return model, records


def check_needs(technique: Technique, context: TechniqueContext) -> None:
    label = f"{technique.backend} {technique.method}"
    if "cuda" in technique.needs and not context.device.startswith("cuda"):
        raise DeviceError(f"{label} runs only on a CUDA GPU", "use --device cuda on a machine with a GPU")
    if "example_input" in technique.needs:
        context.require_example_input(label)
    if "calibration_data" in technique.needs and context.calibration_data is None:
        context.require_calibration_data(label)


def measure(model: Any, script: TestScript, dataset: str, device: str, example_input: Any,
            compiled: Any = None) -> Measurement:
    """Metric, parameters, size and FLOPs of ``model``; latency of ``compiled`` when given, else of ``model``."""
    metrics = script.evaluate(model, dataset, device)
    params, nonzero = count_parameters(model)
    latency = None
    if example_input is not None:
        latency = model_latency(compiled if compiled is not None else model, example_input, device,
                                runtime="compiled" if compiled is not None else "eager")
    return Measurement(metrics.values, metrics.primary, params, nonzero, state_dict_bytes(model), latency,
                       count_flops(model, example_input))


def default_output(model_path: Path) -> Path:
    return model_path.with_name(f"{model_path.stem}.optimized.pt")


def optimize(
    model_path: str | os.PathLike[str],
    *,
    test_script: str | os.PathLike[str],
    dataset: str | os.PathLike[str],
    steps: Sequence[Step],
    output: str | os.PathLike[str] | None = None,
    device: str = "cpu",
    max_accuracy_drop: float | None = None,
    trust_model: bool = False,
    input_shape: Sequence[int] | None = None,
    finetune_steps: int = 0,
    export: bool = False,
    compile: bool = False,
    progress: Callable[[str], None] | None = None,
    manager: PluginManager | None = None,
) -> Report:
    """Run the main job; see ``model-opt optimize --help``. Returns the report; raises ModelOptError."""
    say = progress or (lambda message: None)
    manager = manager or get_plugin_manager()
    # 1. Everything that can be checked without the model, before any heavy work.
    model_path = modelio.check_readable(model_path)
    script = TestScript(test_script)
    dataset = str(dataset)
    if not os.path.exists(dataset):
        raise UsageError(f"test dataset not found: {dataset}", "check the --test-dataset path")
    if not steps:
        raise UsageError("no technique was asked for", "add --prune, --quantize, --fuse or --decompose")
    if max_accuracy_drop is not None and max_accuracy_drop < 0:
        raise UsageError(f"--max-accuracy-drop is {max_accuracy_drop}, which is negative",
                         "pass the largest drop you accept, in the metric's units (e.g. 0.01)")
    out = Path(output) if output else default_output(model_path)
    if out.is_dir():
        out = out / default_output(model_path).name
    if out.resolve() == model_path.resolve():
        raise UsageError(f"--output {out} would overwrite the input model", "choose another output path")
    if finetune_steps < 0:
        raise UsageError(f"--finetune-steps is {finetune_steps}", "pass 0 (no recovery) or a positive number")
    if finetune_steps and not script.has("train"):
        raise UsageError(f"--finetune-steps needs a training hook, and {script.path.name} defines no "
                         "train(model, dataset_path, steps)", "add train() to the test script (see README)")
    if compile and not input_shape and not script.has("example_input") and not script.has("calibration_data"):
        raise UsageError("--compile needs an example input to compile and time the model",
                         "define example_input(dataset_path) in the test script or pass --input-shape")
    planned = plan(steps, manager)
    device = check_device(device)

    import torch

    # 2. Load the model and the inputs the techniques and measurements need.
    say(f"loading {model_path.name}")
    loader = (lambda p: script.call("load_model", p)) if script.has("load_model") else None
    model = modelio.load(model_path, trust_model=trust_model, loader=loader,
                         search_paths=[script.folder, model_path.parent])
    if not isinstance(model, torch.nn.Module):
        raise UsageError(f"{model_path.name} did not load as a torch.nn.Module", "check load_model()")
    model = model.to(device).eval()
    example = example_input(script, dataset, input_shape, device)
    if example is not None:
        run_checked(model, example)
    calibration = (lambda: script.call("calibration_data", dataset)) if script.has("calibration_data") else None
    train = (lambda m, d, n: script.call("train", m, d, n)) if script.has("train") else None
    context = TechniqueContext(device=device, compile=compile, example_input=example, calibration_data=calibration,
                               train=train, dataset_path=dataset, progress=say,
                               evaluate=lambda m: script.evaluate(m, dataset, device).value,
                               max_accuracy_drop=max_accuracy_drop, higher_is_better=script.higher_is_better)
    for technique, _ in planned:
        check_needs(technique, context)

    # 3. Before, apply, after.
    report = Report(model=str(model_path), device=device, threads=torch.get_num_threads(),
                    higher_is_better=script.higher_is_better, before=None,  # type: ignore[arg-type]
                    max_accuracy_drop=max_accuracy_drop)
    if example is None:
        report.latency_note = "define example_input(dataset_path) in the test script or pass --input-shape"
    say("measuring the original model")
    report.before = measure(model, script, dataset, device, example)
    model, report.steps = apply(model, planned, context, manager)
    model = model.eval()
    if finetune_steps:
        report.recovery = {"steps": finetune_steps,
                           "metrics_before_recovery": script.evaluate(model, dataset, device).values}
        say(f"recovery fine-tuning: {finetune_steps} steps")
        with keep_pruned_weights_at_zero(model):
            trained = script.call("train", model, dataset, finetune_steps)
        model = (trained if isinstance(trained, torch.nn.Module) else model).eval()
    compiled = None
    if compile:
        say("compiling the optimized model (torch.compile, inductor freezing)")
        compiled, report.compile_seconds = compile_model(model, example)
    say("measuring the optimized model")
    report.after = measure(model, script, dataset, device, example, compiled)
    report.warnings = speed_warnings(report, planned)

    # 4. Keep the input untouched; write nothing when the budget is exceeded.
    if not report.within_budget:
        raise AccuracyBudgetExceeded(
            f"{report.before.primary} dropped by {report.metric_drop:.4f}, more than --max-accuracy-drop "
            f"{max_accuracy_drop:g}; nothing was written",
            "try a milder setting (smaller amount, fewer techniques) or a recovery step",
            report=report,
        )
    report.output = str(out)
    manifest = {
        "source": str(model_path),
        "steps": [s.to_dict() for s in report.steps],
        "import_paths": [str(script.folder), str(model_path.parent.resolve())],
        "metrics": report.after.metrics,
    }
    say(f"saving {out}")
    modelio.save(model, out, manifest)
    native = getattr(model, "save_native", None)  # e.g. OpenVINO IR beside the artifact
    if callable(native):
        report.native_files = [str(p) for p in native(out)]
    if export:
        report.exported = export_program(model, example, out.with_suffix(".pt2"), report.warnings)
    write_text_atomic(out.with_name("report.json"), report.to_json())
    return report


@contextlib.contextmanager
def keep_pruned_weights_at_zero(model: Any, threshold: float = 0.05) -> Iterator[None]:
    """During recovery fine-tuning, keep weights that pruning zeroed at zero (gradients masked, and masks
    re-applied at the end against weight decay), so that recovery does not undo unstructured sparsity."""
    import torch

    masks = {}
    for parameter in model.parameters():
        if parameter.dim() > 1 and parameter.is_floating_point():
            mask = parameter.detach() != 0
            if (~mask).float().mean().item() > threshold:
                masks[parameter] = mask
    hooks = [p.register_hook(lambda grad, m=m: grad * m) for p, m in masks.items()]
    try:
        yield
    finally:
        for hook in hooks:
            hook.remove()
        with torch.no_grad():
            for parameter, mask in masks.items():
                parameter.mul_(mask)


def export_program(model: Any, example: Any, path: Path, warnings: list[str]) -> str | None:
    """Also save a torch.export program, which loads with no trust flag; warn when the model cannot export."""
    import torch

    from .atomic import atomic_path

    if example is None:
        warnings.append("no .pt2 export: it needs an example input (example_input() or --input-shape)")
        return None
    args, kwargs = ((), example) if isinstance(example, dict) else (
        (tuple(example) if isinstance(example, (tuple, list)) else (example,)), {})
    try:
        try:  # a dynamic batch dimension where the model allows it, else the example's static shapes
            batch = torch.export.Dim("batch", min=1)
            dynamic = [{0: batch} if isinstance(a, torch.Tensor) and a.dim() > 0 else None for a in args]
            program = torch.export.export(model, args, kwargs or None, dynamic_shapes=dynamic if not kwargs else None)
        except Exception:
            program = torch.export.export(model, args, kwargs or None)
        with atomic_path(path) as tmp:
            torch.export.save(program, str(tmp))
    except Exception as exc:
        warnings.append(f"no .pt2 export: torch.export failed ({_first_line(exc)})")
        return None
    return str(path)


def example_input(script: TestScript, dataset: str, input_shape: Sequence[int] | None, device: str) -> Any:
    import torch

    if script.has("example_input"):
        value = script.call("example_input", dataset)
    elif input_shape:
        value = torch.randn(*input_shape)
    elif script.has("calibration_data"):
        value = model_input(next(iter(script.call("calibration_data", dataset)), None))
    else:
        return None
    return to_device(value, device)


def speed_warnings(report: Report, planned: Sequence[tuple[Technique, dict[str, Any]]]) -> list[str]:
    """Plain-words warnings when the techniques did not make the model faster on this device."""
    device = report.device.split(":")[0]
    warnings = [f"{s.backend} {s.method} changed nothing: {s.info.get('note', '')}" for s in report.steps
                if s.info.get("changed") is False]
    warnings += [f"{s.backend} {s.method}: {s.info['warning']}" for s in report.steps if s.info.get("warning")]
    compiled = report.after is not None and report.after.latency is not None and \
        report.after.latency.runtime == "compiled"
    for technique, _ in planned:
        if device in technique.speeds_up_compiled and device not in technique.speeds_up and not compiled:
            warnings.append(f"{technique.backend} {technique.method} speeds up on {device} only under "
                            "torch.compile with freezing: rerun with --compile")
        elif device not in technique.speeds_up and device not in technique.speeds_up_compiled:
            note = f": {technique.speed_note}" if technique.speed_note else ""
            warnings.append(f"{technique.backend} {technique.method} does not reduce latency on {device}{note}")
    speedup = report.speedup
    if speedup is not None:
        if speedup < 0.95:
            warnings.append(f"the optimized model is slower than the original on {device} ({speedup:.2f}x)")
        elif speedup < 1.05:
            warnings.append(f"the optimized model is not measurably faster on {device} ({speedup:.2f}x)")
    return warnings


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0][:200] if lines else type(exc).__name__


__all__ = ["ORDER", "Step", "apply", "optimize", "plan"]
