"""The optimize pipeline: load, measure, apply techniques in a fixed order, measure, save."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from .atomic import write_text_atomic
from .errors import AccuracyBudgetExceeded, ModelOptError, UsageError
from .job import (
    BUILTIN_LM,
    Job,
    Settings,
    Step,
    apply,
    apply_step,
    check_device,
    check_needs,
    default_output,
    output_lock,
    plan,
    report_path,
    side_path,
)
from .measure import (
    Latency,
    call_model,
    compile_model,
    count_flops,
    count_parameters,
    model_latency,
    paired_latency,
    state_dict_bytes,
    timing_budget,
)
from .plugins import PluginManager
from .registry import KINDS, Technique
from .report import UNSTABLE_SPREAD, Measurement, Report
from .testscript import TestScript
from .timing import in_processes, runtime_of

#: Why latency was not measured, by test-script contract (a program-mode script is never imported, so it cannot
#: give an example input).
NO_EXAMPLE_NOTE = {
    "in_process": "not measured: no example input (define example_input(dataset_path) in the test script, or pass "
                  "--input-shape)",
    "program": "not measured: a program-mode test script gives no example input (pass --input-shape, e.g. "
               "1,3,224,224)",
}

#: Combined techniques always run in this order.
ORDER: tuple[str, ...] = KINDS


def measure(model: Any, script: TestScript, dataset: str, device: str, example_input: Any,
            latency: Latency | None = None) -> Measurement:
    """Metric, parameters, size and FLOPs of ``model`` (latency is timed by the caller)."""
    metrics = script.evaluate(model, dataset, device)
    params, nonzero = count_parameters(model)
    return Measurement(metrics.values, metrics.primary, params, nonzero, state_dict_bytes(model), latency,
                       count_flops(model, example_input))


def time_pair(original: Any, optimized: Any, example: Any, device: str, compiled: Any = None,
              runtimes: tuple[str, str] | None = None) -> tuple[Any, Any]:
    """Latency of the original (eager, or as ``runtimes`` names it) and the optimized model (compiled when
    given), interleaved."""
    import torch

    if example is None:
        return None, None
    sync = torch.cuda.synchronize if device.startswith("cuda") else None
    after = compiled if compiled is not None else optimized

    def run(model: Any) -> Callable[[], None]:
        def call() -> None:
            with torch.inference_mode():
                call_model(model, example)
        return call

    return paired_latency(run(original), run(after), sync=sync,
                          runtimes=runtimes or ("eager", "compiled" if compiled is not None else "eager"))


def steadiest(time_once: Callable[[], tuple[Any, Any]], say: Callable[[str], None], attempts: int = 3,
              cap_s: float | None = None) -> tuple[Any, Any]:
    """A before/after latency pair, timed again (up to ``attempts`` times, ``cap_s`` seconds: five timing budgets
    by default) while the timings are unstable; the steadiest is kept (the report shows a range if none was
    steady)."""
    import time

    cap_s = 5 * timing_budget() if cap_s is None else cap_s

    def spread(pair: tuple[Any, Any]) -> float:
        return max(pair[0].spread, pair[1].spread)

    started = time.perf_counter()
    best = time_once()
    for _ in range(attempts - 1):
        if spread(best) <= UNSTABLE_SPREAD or time.perf_counter() - started > cap_s:
            break
        say(f"the timings spread {spread(best):.0%} (the machine is busy): timing again")
        again = time_once()
        if spread(again) < spread(best):
            best = again
    return best


def time_against_original(job: Job, original: Any, model: Any, records: Sequence[Any], compiled: Any = None,
                          say: Callable[[str], None] | None = None, saved: dict[str, Any] | None = None
                          ) -> tuple[Any, Any, str | None]:
    """The original's and ``model``'s latency, as every command reports them: each in a process of its own,
    reopened from a temporary artifact as a user reopens it (``saved``, when the caller has saved it already),
    when the two run in different runtimes (which slow each other in one process); else interleaved in this
    process. Re-timed while unstable. The note says when deployed timing was not possible (timed in this
    process instead)."""
    say = say or job.say
    if job.example is None:  # nothing to time with: the report says why (Report.latency_note)
        return None, None, None
    if in_processes(original, model):
        from .measure import _latency

        own = runtime_of(model)
        runtime = "compiled" if compiled is not None else ("eager" if own == "torch" else own)

        def time_once(saved: dict[str, Any]) -> tuple[Any, Any]:
            timed = job.time_deployed(saved)
            pair = (_latency(timed["original"].samples, "eager", True),
                    _latency(timed["after"].samples, runtime, True))
            pair[0].rounds_ms, pair[1].rounds_ms = timed["original"].rounds_ms, timed["after"].rounds_ms
            return pair

        say("timing the original and the optimized model, each in its own process, interleaved")
        try:
            candidates = contextlib.nullcontext(saved) if saved is not None else \
                job.saved_candidates({"after": (model, records, compiled is not None)})
            with candidates as deployed:
                return (*steadiest(lambda: time_once(deployed), say), None)
        except ModelOptError as exc:
            note = f"timed in this process, not each as deployed ({exc.problem})"
    else:
        note = None
        say("timing the original and the optimized model, interleaved")
    return (*steadiest(lambda: time_pair(original, model, job.example, job.device, compiled), say), note)


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
    finetune_steps = job.settings.finetune_steps
    if job.compile and not job.input_shape and not job.script.has("example_input") \
            and not job.script.has("calibration_data"):
        raise UsageError("--compile needs an example input to compile and time the model",
                         "define example_input(dataset_path) in the test script or pass --input-shape")
    planned = job.plan(steps)
    # Recovery fine-tuning follows the steps that change what a trainable model computes (pruning,
    # decomposition) and comes before fusion and quantization, whose results are not trained.
    split = split_for_recovery(planned) if finetune_steps else (planned, [])

    # 2. Load the model and the inputs the techniques and measurements need.
    original = job.load()
    context = job.context()
    job.check(planned, context)

    # 3. Before, apply, after.
    report, model = measure_before(job)

    def before_recovery(pruned: Any) -> None:
        report.recovery = {"steps": finetune_steps, "after": [t.name for t, _ in split[0]],
                           "metrics_before_recovery": job.script.evaluate(pruned, job.dataset, job.device).values}
        job.say(f"recovery fine-tuning: {finetune_steps} steps")

    model, report.steps = apply_with_recovery(model, split, context, job, finetune_steps, before_recovery)
    measure_after(job, original, model, report)
    report.warnings += speed_warnings(report, planned)  # (after those measuring added)

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
                    max_accuracy_drop=job.max_accuracy_drop)
    if job.script.path == BUILTIN_LM:
        from .builtin.lm_eval import settings

        report.evaluation = settings()
    if example is None:
        report.latency_note = NO_EXAMPLE_NOTE[job.script.mode]
    job.say("measuring the original model")
    report.before = measure(original, job.script, job.dataset, job.device, example)
    model = _working_copy(original)
    if model is original and example is not None:  # techniques may change it in place: time the original now
        report.before.latency = model_latency(original, example, job.device)
        report.latency_note = "the model could not be copied, so before and after were timed one after another"
    return report, model


def measure_after(job: Job, original: Any, model: Any, report: Report) -> None:
    """Compile when asked, measure the optimized model, and time it against the original as each is deployed."""
    example, device, say = job.example, job.device, job.say
    compiled = None
    if job.compile:
        say("compiling the optimized model (torch.compile, inductor freezing)")
        compiled, report.compile_seconds = compile_model(model, example)
    say("measuring the optimized model")
    report.after = measure(model, job.script, job.dataset, device, example)
    if model is not original:
        with contextlib.ExitStack() as stack:
            saved = None
            if job.script.path == BUILTIN_LM and example is not None:  # a causal LM: its memory is measured too
                try:  # saved once, for the timing processes and the memory processes
                    saved = stack.enter_context(job.saved_candidates({"after": (model, report.steps,
                                                                                compiled is not None)}))
                except ModelOptError as exc:
                    report.warnings.append(f"peak memory not measured: {exc.problem}")
            report.before.latency, report.after.latency, note = time_against_original(
                job, original, model, report.steps, compiled, saved=saved)
            report.latency_note = note or report.latency_note
            if saved is not None:
                peak_memory_of(job, saved, report)
        if compiled is not None and not in_processes(original, model):
            # what the technique adds over compiling the float model alone
            say("compiling the original too, and timing both compiled, interleaved")
            original_compiled, _ = compile_model(original, example)
            report.compiled_baseline = steadiest(
                lambda: time_pair(original_compiled, model, example, device, compiled, runtimes=("compiled",) * 2),
                say)
    elif example is not None:
        report.after.latency = model_latency(compiled if compiled is not None else model, example, device,
                                             runtime="compiled" if compiled is not None else "eager")


def peak_memory_of(job: Job, saved: dict[str, Any], report: Report) -> None:
    """The original's and the optimized model's peak memory (``saved`` as :meth:`Job.saved_candidates` gives
    them), each opened and decoding eagerly in its own process (:mod:`model_opt.memory`); a failure is a
    warning, not the end of the run."""
    import dataclasses

    from .builtin.lm_eval import settings
    from .memory import peak_memory

    generate = settings()["generate"]
    report.memory_workload = f"own process: load, then greedy decode of {generate} tokens"
    job.say("measuring peak memory: the original and the optimized model, each loading and decoding in its own "
            "process")
    eager = {name: dataclasses.replace(deployed, compile=False) for name, deployed in saved.items()}
    try:
        peaks = peak_memory(eager, job.example, job.device, decode=True)
    except ModelOptError as exc:
        report.warnings.append(f"peak memory not measured: {exc.problem}")
        return
    report.before.peak_memory_bytes, report.after.peak_memory_bytes = peaks["original"], peaks["after"]


def save_result(job: Job, model: Any, report: Report) -> None:
    """Write the artifact, the files that belong to it (native IR, .pt2) and the report, together."""
    out = job.output
    report.output = str(out)
    extra: dict[str, Any] = {"metrics": report.after.metrics}
    if job.folder and callable(getattr(getattr(model, "config", None), "save_pretrained", None)):
        from .modelio import transformers_note

        note = transformers_note(model)  # checked once: the warning here, the answer in the folder's recipe
        extra["transformers"] = {"opens": note is None, "why_not": note}
        if note:
            report.warnings.append(f"transformers' from_pretrained cannot open the output folder: {note}")
    if job.folder and job.model_path.is_dir():
        from .modelio import copyable_files

        report.warnings += [f"not copied into the output folder: {why}" for why in copyable_files(job.model_path)[1]]
    with output_lock(out):  # the side files first, so that the recipe lists the ones written (all appear together)
        native = getattr(model, "save_native", None)  # e.g. OpenVINO IR beside the artifact (a folder holds it)
        if callable(native) and not job.folder:
            report.native_files = [str(p) for p in native(out)]
        if job.settings.export:
            report.exported = export_program(model, job.example, side_path(out, ".pt2", job.folder),
                                             report.warnings)
        written = [*report.native_files, *([report.exported] if report.exported else []),
                   write_text_atomic(report_path(out, job.folder), report.to_json())]
        job.save(model, report.steps, extra, files=written)


def _working_copy(model: Any) -> Any:
    """A copy to optimize, so that the original stays alive for interleaved timing."""
    import copy

    try:
        return copy.deepcopy(model)
    except Exception:
        return model


#: Kinds of technique whose result is still a trainable model that recovery fine-tuning can repair.
RECOVERABLE_KINDS = ("prune", "decompose")


def split_for_recovery(planned: Sequence[tuple[Technique, dict[str, Any]]]) -> tuple[list, list]:
    """(steps recovery follows: pruning and decomposition, steps after it: fusion and quantization)."""
    if not any(t.kind in RECOVERABLE_KINDS for t, _ in planned):
        raise UsageError("--finetune-steps recovers what pruning or decomposition changed, and no such step was "
                         "asked for", "add --prune or --decompose, or drop --finetune-steps")
    return ([item for item in planned if item[0].kind in RECOVERABLE_KINDS],
            [item for item in planned if item[0].kind not in RECOVERABLE_KINDS])


def apply_with_recovery(model: Any, split: tuple[list, list], context: Any, job: Job, steps: int,
                        before_recovery: Callable[[Any], None] = lambda model: None) -> tuple[Any, list]:
    """Apply the steps recovery follows, fine-tune ``steps`` steps (if any), then apply the rest
    (:func:`split_for_recovery`); returns the eval-mode model and every step's record."""
    trainable, rest = split
    model, records = apply(model, trainable, context, job.manager, allow_unchanged=bool(rest))
    model = model.eval()
    if steps:
        before_recovery(model)
        model = recover(model, job.script, job.dataset, steps).eval()
    if rest:
        model, more = apply(model, rest, context, job.manager,
                            allow_unchanged=any(r.info.get("changed") is not False for r in records))
        records += more
    return model.eval(), records


def recover(model: Any, script: TestScript, dataset: str, steps: int) -> Any:
    """Recovery fine-tuning through the test script's ``train(model, dataset_path, steps)``, pruned zeros kept.

    ``train`` may train in place and return anything (None, its loss) or return the model; a model wrapped
    for training (``DataParallel``, ``DistributedDataParallel``) is unwrapped, so the result saves and reopens
    as the architecture it was given."""
    import torch

    with keep_pruned_weights_at_zero(model):
        trained = script.call("train", model, dataset, steps)
    if not isinstance(trained, torch.nn.Module):
        return model
    while isinstance(trained, (torch.nn.DataParallel, torch.nn.parallel.DistributedDataParallel)):
        trained = trained.module
    return trained


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
    """Also save a torch.export program (``model-opt export --format pt2``: dynamic batch, tiny sample inputs,
    checked at two batch sizes), which loads with no trust flag; warn when the model cannot export."""
    from .export import export_model

    if example is None:
        warnings.append("no .pt2 export: it needs an example input (example_input() or --input-shape)")
        return None
    try:
        export_model(model, example, "pt2", path)
    except ModelOptError as exc:
        warnings.append(f"no .pt2 export: {exc.problem}")
        return None
    return str(path)


def speed_warnings(report: Report, planned: Sequence[tuple[Technique, dict[str, Any]]]) -> list[str]:
    """Plain-words warnings when the techniques did not make the model faster on this device."""
    device = report.device.split(":")[0]
    warnings = [f"{s.backend} {s.method} changed nothing: {s.info.get('note', '')}" for s in report.steps
                if s.info.get("changed") is False]
    warnings += [f"{s.backend} {s.method}: {s.info['warning']}" for s in report.steps if s.info.get("warning")]
    compiled = report.after is not None and report.after.latency is not None and \
        report.after.latency.runtime == "compiled"
    for technique, options in planned:
        speeds_up = technique.speeds_up_on(options)
        if device in technique.speeds_up_compiled and device not in speeds_up and not compiled:
            warnings.append(f"{technique.backend} {technique.method} speeds up on {device} only under "
                            "torch.compile with freezing: rerun with --compile")
        elif device not in speeds_up and device not in technique.speeds_up_compiled:
            note = f": {technique.speed_note}" if technique.speed_note else ""
            warnings.append(f"{technique.backend} {technique.method} does not reduce latency on {device}{note}")
    before, after = report.before.latency, report.after.latency if report.after else None
    if before and after and max(before.spread, after.spread) > UNSTABLE_SPREAD:
        warnings.append(f"the latency measurement was unstable (timings spread {max(before.spread, after.spread):.0%} "
                        "around the median: the CPU was busy), so no single speed-up is shown: rerun on an idle "
                        "machine before trusting one")
    speedup = report.speedup if report.stable else None
    if speedup is not None:
        if speedup < 0.95:
            warnings.append(f"the optimized model is slower than the original on {device} ({speedup:.2f}x)")
        elif speedup < 1.05:
            warnings.append(f"the optimized model is not measurably faster on {device} ({speedup:.2f}x)")
    return warnings



__all__ = ["ORDER", "Step", "apply", "apply_step", "check_device", "check_needs", "default_output", "optimize",
           "plan"]
