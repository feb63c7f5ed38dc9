"""Before against after: the original and the optimized model timed (each as deployed: in this process, or each in
a process of its own when they run in different runtimes) and their peak memory, the way every command reports
them. All timing goes through :func:`model_opt.measure.rotating_rounds`."""

from __future__ import annotations

import contextlib
import dataclasses
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import ModelOptError
from .measure import Latency, call_model, compile_model, timed_blocks, timing_budget
from .memory import peak_memory
from .report import DECODE, UNSTABLE_SPREAD, Report, StepRecord
from .timing import DECODE_ROUNDS, Deployed, decode_deployed, in_processes, runtime_of, time_deployed

if TYPE_CHECKING:
    from .job import Job


@dataclass
class Timed:
    """One before/after timing, every model in the same rounds: the original as the user runs it today, the float
    model in the result's runtime when the result runs in another one (``runtime``: compiled, OpenVINO), and the
    result. ``note`` says when deployed timing was not possible (timed in this process instead)."""

    before: Latency | None = None
    after: Latency | None = None
    runtime: Latency | None = None
    note: str | None = None

    @property
    def spread(self) -> float:
        return max(t.spread for t in (self.before, self.after, self.runtime) if t is not None)


def time_models(models: dict[str, tuple[Any, str]], example: Any, device: str) -> dict[str, Latency]:
    """Each named ``(model, runtime)`` timed in this process, in the same rotating rounds."""
    import torch

    sync = torch.cuda.synchronize if device.startswith("cuda") else None

    def run(model: Any) -> Callable[[], None]:
        def call() -> None:
            with torch.inference_mode():
                call_model(model, example)
        return call

    timed = timed_blocks({name: run(model) for name, (model, _) in models.items()}, sync=sync)
    return {name: timed[name].latency(runtime) for name, (_, runtime) in models.items()}


def steadiest(time_once: Callable[[], Timed], progress: Callable[[str], None], attempts: int = 3,
              cap_s: float | None = None) -> Timed:
    """A timing, done again (up to ``attempts`` times, ``cap_s`` seconds: five timing budgets by default) while it
    is unstable; the steadiest is kept (the report shows a range if none was steady)."""
    cap_s = 5 * timing_budget() if cap_s is None else cap_s
    started = time.perf_counter()
    best = time_once()
    for _ in range(attempts - 1):
        if best.spread <= UNSTABLE_SPREAD or time.perf_counter() - started > cap_s:
            break
        progress(f"the timings spread {best.spread:.0%} (the machine is busy): timing again")
        again = time_once()
        if again.spread < best.spread:
            best = again
    return best


def float_counterpart(model: Any) -> tuple[Any, str] | None:
    """The float model in ``model``'s own runtime, when ``model`` runs in another runtime than torch and offers one
    (``float_counterpart()``: an OpenVINO result's float IR), with that runtime's name; else None."""
    counterpart = getattr(model, "float_counterpart", None)
    built = counterpart() if callable(counterpart) else None
    return (built, runtime_of(model)) if built is not None else None


def time_against_original(job: Job, original: Any, model: Any, records: Sequence[Any], compiled: Any = None,
                          progress: Callable[[str], None] | None = None, saved: dict[str, Any] | None = None,
                          split: bool = False) -> Timed:
    """The original's and ``model``'s latency, as every command reports them: each in a process of its own,
    reopened from a temporary artifact as a user reopens it (``saved``, when the caller has saved it already),
    when the two run in different runtimes (which slow each other in one process); else in this process, in the
    same rounds. With ``split``, the float model in the result's runtime (the original compiled, for a compiled
    result; an OpenVINO result's float IR) is timed in the same rounds too, which splits the speed-up into the
    runtime's part and the technique's. Timed again while unstable."""
    progress = progress or job.progress
    if job.example is None:  # nothing to time with: the report says why (Report.latency_note)
        return Timed()
    own = runtime_of(model)
    runtime = "compiled" if compiled is not None else ("eager" if own == "torch" else own)
    note = None
    if in_processes(original, model):
        def time_once(saved: dict[str, Any]) -> Timed:
            timed = time_deployed(saved, job.example, job.device)
            return Timed(timed["original"].latency("eager"), timed["after"].latency(runtime),
                         timed["runtime"].latency(runtime) if "runtime" in timed else None)

        progress("timing the original and the optimized model, each in its own process, interleaved")
        try:
            with contextlib.ExitStack() as stack:
                deployed = dict(saved) if saved is not None else stack.enter_context(
                    saved_candidates(job, {"after": (model, records, compiled is not None)}))
                if not split:
                    deployed.pop("runtime", None)
                elif compiled is not None:  # the original's own file, compiled in its process
                    deployed["runtime"] = dataclasses.replace(deployed["original"], compile=True)
                elif "runtime" not in deployed and (counterpart := float_counterpart(model)) is not None:
                    deployed.update(stack.enter_context(saved_candidates(job, {"runtime": (
                        counterpart[0], records, False)}, original=False)))  # (reopened by the result's steps)
                return steadiest(lambda: time_once(deployed), progress)
        except ModelOptError as exc:
            note = f"timed in this process, not each as deployed ({exc.problem})"
    progress("timing the original and the optimized model, interleaved")
    models = {"original": (original, "eager"), "after": (compiled if compiled is not None else model, runtime)}
    if split:
        counterpart = (compile_model(original, job.example)[0], "compiled") if compiled is not None else \
            float_counterpart(model)
        if counterpart is not None:
            models["runtime"] = counterpart

    def in_process() -> Timed:
        timed = time_models(models, job.example, job.device)
        return Timed(timed["original"], timed["after"], timed.get("runtime"), note)

    return steadiest(in_process, progress)


@contextlib.contextmanager
def saved_candidates(job: Job, candidates: dict[str, tuple[Any, Sequence[StepRecord], bool]],
                     original: bool = True) -> Iterator[dict]:
    """Each candidate ``(model, records, compiled)`` saved to a temporary artifact, as a timing or memory process
    reopens it (our own file, so trusted), beside (unless not ``original``) the original opened from its file as
    ``job`` did."""
    with tempfile.TemporaryDirectory(prefix="model-opt-candidates-") as tmp:
        hooks = {"model_path": str(job.model_path.resolve()), "run_compiled": job.compile}
        saved = {"original": Deployed(str(job.model_path.resolve()), str(job.script.path), job.trust_model,
                                      **hooks)} if original else {}
        for name, (model, records, compiled) in candidates.items():
            path = job.save(model, records, path=Path(tmp) / f"{name}.pt")
            saved[name] = Deployed(str(path), str(job.script.path), trust_model=True, compile=compiled, **hooks)
        yield saved


def decode_as_deployed(job: Job, saved: dict[str, Any], report: Report, runtime: str) -> None:
    """A causal LM's decode figures, before and after, each model in its own process (``saved`` as
    :func:`saved_candidates` gives them), in place of the evaluation's figures from this process, which holds
    both runtimes at once; with the float model in the result's ``runtime`` too when ``saved`` has it, which splits
    the decode speed-up into the runtime's part and the technique's. A failure is a warning and the evaluation's
    figures stay."""
    if DECODE not in report.before.metrics or report.after is None or DECODE not in report.after.metrics:
        return
    job.progress("timing decode: the original and the optimized model, each in its own process, interleaved")
    candidates = {name: saved[name] for name in ("original", "after", "runtime") if name in saved}
    try:
        rates = decode_deployed(candidates, job.example, job.device)
    except ModelOptError as exc:
        report.warnings.append(f"decode timed in this process, not each as deployed: {exc.problem}")
        return
    report.before.metrics.update(rates["original"].metrics())
    report.after.metrics.update(rates["after"].metrics())
    if "runtime" in rates:
        report.runtime_decode = (runtime, rates["runtime"].tokens_per_s)
    report.decode_workload = f"each model in its own process, the median of {DECODE_ROUNDS} interleaved rounds"


def peak_memory_of(job: Job, saved: dict[str, Any], report: Report) -> None:
    """The original's and the optimized model's peak memory (``saved`` as :func:`saved_candidates` gives them),
    each opened and decoding eagerly in its own process (:mod:`model_opt.memory`); a failure is a warning, not the
    end of the run."""
    from .builtin.lm_eval import settings

    generate = settings()["generate"]
    report.memory_workload = f"own process: load, then greedy decode of {generate} tokens"
    job.progress("measuring peak memory: the original and the optimized model, each loading and decoding in its "
                 "own process")
    eager = {name: dataclasses.replace(deployed, compile=False) for name, deployed in saved.items()
             if name in ("original", "after")}
    try:
        peaks = peak_memory(eager, job.example, job.device, decode=True)
    except ModelOptError as exc:
        report.warnings.append(f"peak memory not measured: {exc.problem}")
        return
    report.before.peak_memory_bytes, report.after.peak_memory_bytes = peaks["original"], peaks["after"]
