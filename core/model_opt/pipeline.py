"""The optimize pipeline: check, load, measure before, apply the techniques in pipeline order (with recovery
fine-tuning after the steps it repairs), measure after against the original as each is deployed, and save the
result with its report, or nothing when the metric fell further than allowed."""

from __future__ import annotations

import contextlib
import copy
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from .atomic import write_text_atomic
from .compare import (
    decode_as_deployed,
    float_counterpart,
    peak_memory_of,
    saved_candidates,
    time_against_original,
)
from .device import device_profile
from .errors import AccuracyBudgetExceeded, ModelOptError, UsageError
from .export import export_model
from .hf import copyable_files, transformers_note
from .job import Job, Settings
from .measure import Latency, compile_model, count_flops, count_parameters, model_latency, state_dict_bytes
from .outputs import output_lock, report_path, side_path
from .plugins import PluginManager
from .report import Measurement, Report
from .sensitivity import mix_for_budget
from .speed_advice import speed_warnings
from .steps import Step, apply_with_recovery, check, plan, split_for_recovery
from .testscript import BUILTIN_LM, TestScript
from .timing import in_processes, runtime_of

#: Why latency was not measured, by test-script contract (a program-mode script is never imported, so it cannot
#: give an example input).
NO_EXAMPLE_NOTE = {
    "in_process": "not measured: no example input (define example_input(dataset_path) in the test script, or pass "
                  "--input-shape)",
    "program": "not measured: a program-mode test script gives no example input (pass --input-shape, e.g. "
               "1,3,224,224)",
}

def measure(model: Any, script: TestScript, dataset: str, device: str, example_input: Any,
            latency: Latency | None = None, runnable: Any = None) -> Measurement:
    """Metric, parameters, size and FLOPs of ``model`` (latency is timed by the caller); the metric of
    ``runnable`` where given (the compiled model: evaluated as it is deployed)."""
    metrics = script.evaluate(script.as_deployed(model, runnable), dataset, device)
    params, nonzero = count_parameters(model)
    return Measurement(metrics.values, metrics.primary, params, nonzero, state_dict_bytes(model), latency,
                       count_flops(model, example_input))


def optimize(model_path: str | os.PathLike[str], *, test_script: str | os.PathLike[str],
             dataset: str | os.PathLike[str], steps: Sequence[Step], progress: Callable[[str], None] | None = None,
             manager: PluginManager | None = None, **settings: Any) -> Report:
    """Run the main job; see ``model-opt optimize --help``. ``settings`` are :class:`model_opt.job.Settings`
    (output, device, max_accuracy_drop, trust_model, input_shape, finetune_steps, export, compile).
    Returns the report; raises ModelOptError."""
    # 1. Everything that can be checked without the model, before any heavy work.
    if not steps:
        raise UsageError("no technique was asked for", "add --prune, --quantize, --fuse or --decompose")
    job = Job.prepare(model_path, test_script=test_script, dataset=dataset,
                      settings=Settings.of(settings, "optimize"), progress=progress, manager=manager)
    train_steps = job.settings.finetune_steps
    if job.compile and not job.input_shape and not job.script.has("example_input") \
            and not job.script.has("calibration_data"):
        raise UsageError("--compile needs an example input to compile and time the model",
                         "define example_input(dataset_path) in the test script or pass --input-shape")
    planned = plan(steps, job.manager)
    # Recovery fine-tuning follows the steps that change what a trainable model computes (pruning,
    # decomposition) and comes before fusion and quantization, whose results are not trained.
    split = split_for_recovery(planned) if train_steps else (planned, [])

    # 2. Load the model and the inputs the techniques and measurements need.
    original = job.load()
    context = job.context()
    check(original, planned, context)

    # 3. Before, apply, after.
    report, model = measure_before(job)

    def before_recovery(pruned: Any) -> None:
        report.recovery = {"steps": train_steps, "after": [t.name for t, _ in split[0]],
                           "metrics_before_recovery": job.script.evaluate(pruned, job.dataset, job.device).values}
        job.progress(f"recovery fine-tuning: {train_steps} steps")

    model, report.steps = apply_with_recovery(model, split, context, job.manager, train_steps, before_recovery)
    measure_after(job, original, model, report)
    mixed = mix_for_budget(job, original, planned, context, report)
    if mixed is not None:  # the most sensitive layers kept unchanged: measured again as the result
        model, report.steps = mixed
        measure_after(job, original, model, report)
    report.warnings += speed_warnings(report, planned, job.family)  # (after those measuring added)

    # 4. Keep the input untouched; write nothing when the budget is exceeded.
    if not report.within_budget:
        raise AccuracyBudgetExceeded(
            f"{report.before.primary} dropped by {report.metric_drop:.4f}, more than --max-accuracy-drop "
            f"{job.max_accuracy_drop:g}; nothing was written",
            "try a milder setting (smaller amount, fewer techniques) or a recovery step",
            report=report,
        )
    save_result(job, model, report)
    return report


def measure_before(job: Job) -> tuple[Report, Any]:
    """The report with the original measured, and the working copy the techniques change."""
    import torch

    original, example = job.model, job.example
    report = Report(model=str(job.model_path), device=job.device, threads=torch.get_num_threads(),
                    higher_is_better=job.script.higher_is_better, before=None,  # type: ignore[arg-type]
                    max_accuracy_drop=job.max_accuracy_drop, profile=device_profile())
    if job.script.path == BUILTIN_LM:
        from .builtin.lm_eval import settings

        report.evaluation = settings()
    if example is None:
        report.latency_note = NO_EXAMPLE_NOTE[job.script.mode]
    job.progress("measuring the original model")
    report.before = measure(original, job.script, job.dataset, job.device, example)
    model = _working_copy(original)
    if model is original and example is not None:  # techniques may change it in place: time the original now
        report.before.latency = model_latency(original, example, job.device)
        report.latency_note = "the model could not be copied, so before and after were timed one after another"
    return report, model


def measure_after(job: Job, original: Any, model: Any, report: Report) -> None:
    """Compile when asked, measure the optimized model, and time it against the original as each is deployed."""
    example, device, progress = job.example, job.device, job.progress
    compiled = None
    if job.compile:
        progress("compiling the optimized model (torch.compile, inductor freezing)")
        compiled, report.compile_seconds = compile_model(model, example)
    progress("measuring the optimized model")
    report.after = measure(model, job.script, job.dataset, device, example, runnable=compiled)
    if model is not original:
        with contextlib.ExitStack() as stack:
            saved = None
            if job.script.path == BUILTIN_LM and example is not None:  # a causal LM: its memory is measured too
                try:  # saved once, for the timing processes and the memory processes
                    saved = stack.enter_context(saved_candidates(job, {"after": (model, report.steps,
                                                                                 compiled is not None)}))
                    counterpart = float_counterpart(model) if compiled is None else None
                    if counterpart is not None:  # the float model in the result's runtime: latency and decode
                        saved.update(stack.enter_context(saved_candidates(job, {"runtime": (
                            counterpart[0], report.steps, False)}, original=False)))
                except ModelOptError as exc:
                    report.warnings.append(f"peak memory not measured: {exc.problem}")
            timed = time_against_original(job, original, model, report.steps, compiled, saved=saved, split=True)
            report.before.latency, report.after.latency, report.runtime_latency = \
                timed.before, timed.after, timed.runtime
            report.latency_note = timed.note or report.latency_note
            if saved is not None:
                if compiled is None and in_processes(original, model):
                    decode_as_deployed(job, saved, report, runtime_of(model))
                peak_memory_of(job, saved, report)
    elif example is not None:
        report.after.latency = model_latency(compiled if compiled is not None else model, example, device,
                                             runtime="compiled" if compiled is not None else "eager")


def save_result(job: Job, model: Any, report: Report) -> None:
    """Write the artifact, the files that belong to it (native IR, .pt2) and the report, together."""
    out = job.output
    report.output = str(out)
    extra: dict[str, Any] = {"metrics": report.after.metrics}
    if job.folder_output and callable(getattr(getattr(model, "config", None), "save_pretrained", None)):
        note = transformers_note(model)  # checked once: the warning here, the answer in the folder's recipe
        extra["transformers"] = {"opens": note is None, "why_not": note}
        if note:
            report.warnings.append(f"transformers' from_pretrained cannot open the output folder: {note}")
    if job.folder_output and job.model_path.is_dir():
        report.warnings += [f"not copied into the output folder: {why}" for why in copyable_files(job.model_path)[1]]
    with output_lock(out):  # the side files first, so that the recipe lists the ones written (all appear together)
        native = getattr(model, "save_native", None)  # e.g. OpenVINO IR beside the artifact (a folder holds it)
        if callable(native) and not job.folder_output:
            report.native_files = [str(p) for p in native(out)]
        if job.settings.export:
            report.exported = export_beside(model, job.example, side_path(out, ".pt2", job.folder_output),
                                             report.warnings)
        written = [*report.native_files, *([report.exported] if report.exported else []),
                   write_text_atomic(report_path(out, job.folder_output), report.to_json())]
        job.save(model, report.steps, extra, files=written)


def _working_copy(model: Any) -> Any:
    """A copy to optimize, so that the original stays alive for interleaved timing."""
    try:
        return copy.deepcopy(model)
    except Exception:
        return model


def export_beside(model: Any, example: Any, path: Path, warnings: list[str]) -> str | None:
    """Also save a torch.export program (``model-opt export --format pt2``: dynamic batch, tiny sample inputs,
    checked at two batch sizes), which loads with no trust flag; warn when the model cannot export."""
    if example is None:
        warnings.append("no .pt2 export: it needs an example input (example_input() or --input-shape)")
        return None
    try:
        export_model(model, example, "pt2", path)
    except ModelOptError as exc:
        warnings.append(f"no .pt2 export: {exc.problem}")
        return None
    return str(path)
