"""``model-opt export --report``: the float model in another runtime, measured as a result is.

The route with no technique (recommend's first line where every technique is slow on the CPU): the export is opened
in its runtime, evaluated with the test script's metric, and timed against the original, each alone in its own
process, interleaved, as ``model-opt optimize`` times its results. The report says the whole speed-up is the
runtime's. Nothing is written unless the metric stays within ``--max-accuracy-drop``; then the export and its report
are written together.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from .atomic import atomic_path, written_together
from .device import device_profile
from .errors import AccuracyBudgetExceeded, BackendNotInstalled, UsageError
from .export import ExportResult, _put_in_place, check_format, export_model
from .job import Settings
from .measure import Latency
from .modelio import open_model
from .outputs import EXPORT_SUFFIXES, check_export_output, export_target, report_path
from .report import Report
from .speed_advice import speed_warnings
from .testscript import TestScript, example_input
from .timing import Deployed, runtime_of, time_deployed

#: The formats whose files model-opt opens in their runtime (a plugin's ``load_model``), so that it can measure them.
MEASURED_FORMATS = ("openvino",)


def export_with_report(model_path: str | os.PathLike[str], fmt: str, *, test_script: str | os.PathLike[str] | None,
                       dataset: str | None, output: str | None = None, input_shape: Sequence[int] | None = None,
                       static: bool = False, trust_model: bool = False, max_accuracy_drop: float | None = None,
                       device: str = "cpu", progress: Callable[[str], None] = lambda message: None
                       ) -> tuple[ExportResult, Report]:
    """Export the float model in ``fmt``, then measure the export against the original as ``optimize`` measures a
    result (the test script's metric; latency with each deployed alone); write the export and its report together,
    or nothing when the metric dropped more than ``max_accuracy_drop``."""
    import torch

    from .pipeline import measure

    fmt = check_format(fmt)
    if fmt not in MEASURED_FORMATS:
        raise UsageError(f"--report measures the export in its runtime, and model-opt runs {fmt} files in none",
                         f"use --format {' or '.join(MEASURED_FORMATS)}, or leave out --report")
    if test_script is None or dataset is None:
        raise UsageError("--report evaluates the export with your metric, so it needs --test-script and "
                         "--test-dataset", "pass both, or leave out --report")
    device = Settings(max_accuracy_drop=max_accuracy_drop, input_shape=input_shape, device=device).check().device
    model_path = Path(model_path)
    out = check_export_output(export_target(model_path, fmt, output), model_path, fmt)
    if report_path(out).exists() or report_path(out).is_symlink():  # (its report is never replaced either)
        raise UsageError(f"{report_path(out)} already exists", "choose another --output, or remove the file yourself")
    if not Path(dataset).exists():
        raise UsageError(f"test dataset not found: {dataset}", "check the --test-dataset path")
    script = TestScript(test_script, model_path=model_path)
    original = open_model(model_path, script, trust_model)
    if runtime_of(original) != "torch":
        raise UsageError(f"{model_path.name} runs in {runtime_of(original)} already, so there is no float model "
                         "to convert", "pass the torch model it was made from")
    original = original.to(device).eval()
    example = example_input(script, dataset, input_shape)
    if example is None:
        raise UsageError("--report times the export, which needs an example input",
                         "define example_input(dataset_path) in the test script, or pass --input-shape")
    report = Report(model=str(model_path), device=device, threads=torch.get_num_threads(),
                    higher_is_better=script.higher_is_better, before=None,  # type: ignore[arg-type]
                    max_accuracy_drop=max_accuracy_drop, profile=device_profile(), no_technique=True)
    progress("measuring the original model")
    report.before = measure(original, script, dataset, device, example)
    with staged_export(original, example, fmt, static, progress) as (result, staged, exported):
        runtime = runtime_of(exported)
        progress(f"measuring the export in {runtime}")
        report.after = measure(exported, script, dataset, device, example)
        report.before.latency, report.after.latency = timed_against_original(
            Deployed(str(model_path.resolve()), str(script.path), trust_model, model_path=str(model_path.resolve())),
            staged, runtime, example, device, progress)
        report.runtime_latency = report.after.latency
        if not report.within_budget:
            raise AccuracyBudgetExceeded(
                f"{report.before.primary} dropped by {report.metric_drop:.4f} in {runtime}, more than "
                f"--max-accuracy-drop {max_accuracy_drop:g}; nothing was written",
                "export without --report to inspect it, or keep the torch model", report=report)
        report.warnings += speed_warnings(report, [])
        report.output = str(out)
        with written_together():
            result.files = _put_in_place(staged, fmt, out)
            with atomic_path(report_path(out)) as path:
                path.write_text(report.to_json())
    return result, report


@contextlib.contextmanager
def staged_export(model: Any, example: Any, fmt: str, static: bool = False,
                  progress: Callable[[str], None] = lambda message: None) -> Iterator[tuple[ExportResult, Path, Any]]:
    """``model`` exported in ``fmt`` to a temporary file (checked as every export is), and opened in its runtime as
    every command opens such a file: (the export's result, its path, the opened model). A format no installed plugin
    runs is a one-line error with the install command."""
    with tempfile.TemporaryDirectory(prefix="model-opt-export-report-") as tmp:
        staged = Path(tmp) / f"model{EXPORT_SUFFIXES[fmt]}"
        result = export_model(model, example, fmt, staged, static=static, progress=progress)
        exported = open_model(staged, None, False)  # (a plugin's module, e.g. OpenVINO IR's)
        if runtime_of(exported) == "torch":
            raise BackendNotInstalled(f"no installed plugin runs {fmt} files, so the export cannot be measured",
                                      'pip install "model-opt[all]" (model-opt plugins lists what is installed), '
                                      "or leave out --report")
        yield result, staged, exported


def timed_against_original(original: Deployed, exported: Path, runtime: str, example: Any, device: str,
                           progress: Callable[[str], None] = lambda message: None) -> tuple[Latency, Latency]:
    """The original's latency (eager) and the exported file's (in ``runtime``), each opened alone in its own process,
    in interleaved rounds (the timing every command uses)."""
    progress(f"timing the original (eager) and the export ({runtime}), each in its own process, interleaved")
    timed = time_deployed({"original": original, "after": Deployed(str(exported))}, example, device)
    return timed["original"].latency("eager"), timed["after"].latency(runtime)
