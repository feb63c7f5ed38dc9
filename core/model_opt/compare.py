"""Before against after: the original and the optimized model timed (each as deployed: in this process, or each in
a process of its own when they run in different runtimes) and their peak memory, the way every command reports
them. All timing goes through :func:`model_opt.measure.rotating_rounds`."""

from __future__ import annotations

import contextlib
import dataclasses
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import ModelOptError
from .measure import Latency, call_model, paired_latency, timing_budget
from .memory import peak_memory
from .report import UNSTABLE_SPREAD, Report, StepRecord
from .timing import Deployed, in_processes, runtime_of, time_deployed

if TYPE_CHECKING:
    from .job import Job


def time_pair(original: Any, optimized: Any, example: Any, device: str, compiled: Any = None,
              runtimes: tuple[str, str] | None = None) -> tuple[Latency, Latency]:
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


def steadiest(time_once: Callable[[], tuple[Any, Any]], progress: Callable[[str], None], attempts: int = 3,
              cap_s: float | None = None) -> tuple[Any, Any]:
    """A before/after latency pair, timed again (up to ``attempts`` times, ``cap_s`` seconds: five timing budgets
    by default) while the timings are unstable; the steadiest is kept (the report shows a range if none was
    steady)."""
    cap_s = 5 * timing_budget() if cap_s is None else cap_s

    def spread(pair: tuple[Any, Any]) -> float:
        return max(pair[0].spread, pair[1].spread)

    started = time.perf_counter()
    best = time_once()
    for _ in range(attempts - 1):
        if spread(best) <= UNSTABLE_SPREAD or time.perf_counter() - started > cap_s:
            break
        progress(f"the timings spread {spread(best):.0%} (the machine is busy): timing again")
        again = time_once()
        if spread(again) < spread(best):
            best = again
    return best


def time_against_original(job: Job, original: Any, model: Any, records: Sequence[Any], compiled: Any = None,
                          progress: Callable[[str], None] | None = None, saved: dict[str, Any] | None = None
                          ) -> tuple[Any, Any, str | None]:
    """The original's and ``model``'s latency, as every command reports them: each in a process of its own,
    reopened from a temporary artifact as a user reopens it (``saved``, when the caller has saved it already),
    when the two run in different runtimes (which slow each other in one process); else interleaved in this
    process. Re-timed while unstable. The note says when deployed timing was not possible (timed in this
    process instead)."""
    progress = progress or job.progress
    if job.example is None:  # nothing to time with: the report says why (Report.latency_note)
        return None, None, None
    if in_processes(original, model):
        own = runtime_of(model)
        runtime = "compiled" if compiled is not None else ("eager" if own == "torch" else own)

        def time_once(saved: dict[str, Any]) -> tuple[Any, Any]:
            timed = time_deployed(saved, job.example, job.device)
            return timed["original"].latency("eager"), timed["after"].latency(runtime)

        progress("timing the original and the optimized model, each in its own process, interleaved")
        try:
            candidates = contextlib.nullcontext(saved) if saved is not None else \
                saved_candidates(job, {"after": (model, records, compiled is not None)})
            with candidates as deployed:
                return (*steadiest(lambda: time_once(deployed), progress), None)
        except ModelOptError as exc:
            note = f"timed in this process, not each as deployed ({exc.problem})"
    else:
        note = None
        progress("timing the original and the optimized model, interleaved")
    return (*steadiest(lambda: time_pair(original, model, job.example, job.device, compiled), progress), note)


@contextlib.contextmanager
def saved_candidates(job: Job, candidates: dict[str, tuple[Any, Sequence[StepRecord], bool]]) -> Iterator[dict]:
    """Each candidate ``(model, records, compiled)`` saved to a temporary artifact, as a timing or memory process
    reopens it (our own file, so trusted), beside the original opened from its file as ``job`` did."""
    with tempfile.TemporaryDirectory(prefix="model-opt-candidates-") as tmp:
        hooks = {"model_path": str(job.model_path.resolve()), "run_compiled": job.compile}
        saved = {"original": Deployed(str(job.model_path.resolve()), str(job.script.path), job.trust_model,
                                      **hooks)}
        for name, (model, records, compiled) in candidates.items():
            path = job.save(model, records, path=Path(tmp) / f"{name}.pt")
            saved[name] = Deployed(str(path), str(job.script.path), trust_model=True, compile=compiled, **hooks)
        yield saved


def peak_memory_of(job: Job, saved: dict[str, Any], report: Report) -> None:
    """The original's and the optimized model's peak memory (``saved`` as :func:`saved_candidates` gives them),
    each opened and decoding eagerly in its own process (:mod:`model_opt.memory`); a failure is a warning, not the
    end of the run."""
    from .builtin.lm_eval import settings

    generate = settings()["generate"]
    report.memory_workload = f"own process: load, then greedy decode of {generate} tokens"
    job.progress("measuring peak memory: the original and the optimized model, each loading and decoding in its "
                 "own process")
    eager = {name: dataclasses.replace(deployed, compile=False) for name, deployed in saved.items()}
    try:
        peaks = peak_memory(eager, job.example, job.device, decode=True)
    except ModelOptError as exc:
        report.warnings.append(f"peak memory not measured: {exc.problem}")
        return
    report.before.peak_memory_bytes, report.after.peak_memory_bytes = peaks["original"], peaks["after"]
