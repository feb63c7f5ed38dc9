"""Measured, accuracy-budgeted search over every installed technique, on Optuna storage.

Every candidate is applied to a fresh copy of the model, evaluated with the user's metric and timed on
the same device and thread count as the baseline; candidates over the budget are kept as evidence.
Workers on many machines can share one study through any Optuna storage URL.
"""

from __future__ import annotations

import copy
import json
import math
import os
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from .atomic import atomic_path, write_text_atomic
from .context import TechniqueContext
from .errors import AccuracyBudgetExceeded, ModelOptError, TechniqueError, UsageError
from .errors import describe as describe_error
from .job import Job, Settings, output_lock, report_path, side_path
from .measure import count_parameters, model_latency, state_dict_bytes
from .pipeline import RECOVERABLE_KINDS, time_against_original
from .plugins import PluginManager
from .recommend import detect_family, recommend
from .redaction import check_url, redact
from .registry import KINDS, Technique
from .report import dumps, speed_text
from .tuning_storage import (
    check_study_name,
    expire_dead_trials,
    grace_s,
    heartbeat_s,
    lease,
    open_study,
    worker_id,
)

OBJECTIVES = ("latency", "size", "both", "tokens-per-second")
#: What ``--objective tokens-per-second`` reads from the evaluation (the built-in causal-LM one reports it;
#: ``_compiled`` when the candidate's decode runs compiled).
DECODE_METRIC = "decode_tokens_per_s"


@dataclass
class Baseline:
    metric: float
    latency_ms: float
    size_bytes: int
    parameters: int
    #: the original's decode tokens/s (float, eager), for ``--objective tokens-per-second``
    decode_tokens_per_s: float | None = None


@dataclass
class TuneResult:
    study: str
    storage: str
    baseline: Baseline
    trials: list[dict[str, Any]]
    pareto: list[dict[str, Any]]
    best: dict[str, Any] | None
    output: str | None = None
    plot: str | None = None
    warnings: list[str] = field(default_factory=list)
    objective: str = "latency"

    def to_dict(self) -> dict[str, Any]:
        """The summary (the best candidate) first, then every trial."""
        best = self.best or {}
        summary = {"best_trial": best.get("number"), "techniques": best.get("description"),
                   "speedup": best.get("remeasured_speedup", best.get("speedup")), "metric": best.get("metric"),
                   "metric_drop": best.get("drop"), "size_ratio": best.get("size_ratio"), "trials": len(self.trials),
                   "objective": self.objective,
                   "output": self.output, "warnings": len(self.warnings)}
        return {"summary": summary, "study": self.study, "storage": self.storage, "baseline": self.baseline.__dict__,
                "trials": self.trials, "pareto": self.pareto, "best": self.best, "output": self.output,
                "plot": self.plot, "warnings": self.warnings}

    def render(self) -> str:
        lines = [f"autotune study {self.study!r}: {len(self.trials)} trials, baseline metric "
                 f"{self.baseline.metric:.4f}, latency {self.baseline.latency_ms:.3f} ms"]
        lines.append("Pareto front within budget (metric vs latency vs size; * the best, re-measured):")
        header = f"  {'trial':>6}  {'metric':>8}  {'drop':>8}  {'speed-up':>8}  {'size':>6}  techniques"
        lines.append(header)
        best_number = self.best["number"] if self.best else None
        shown = [*self.pareto, *([self.best] if self.best and self.best not in self.pareto else [])]
        for row in shown:
            mark = "*" if row["number"] == best_number else " "
            lines.append(f"  {mark}{row['number']:>5}  {row['metric']:>8.4f}  {row['drop']:>8.4f}  "
                         f"{row['speedup']:>7.2f}x  {row['size_ratio']:>5.2f}x  {row['description']}")
        if self.best:
            speed = self.best.get("remeasured_speedup", self.best["speedup"])
            how = ("decode tokens/s over the original's, decoded again" if self.objective == "tokens-per-second"
                   else "re-measured against the original, interleaved")
            lines.append(f"best: trial {self.best['number']} ({self.best['description']}), {speed_text(speed)} "
                         f"({how}), size {self.best['size_ratio']:.2f}x, "
                         f"metric {self.best['metric']:.4f}")
        for warning in self.warnings:
            lines.append(f"warning: {warning}")
        if self.output:
            lines.append(f"saved: {self.output}")
        if self.plot:
            lines.append(f"plot: {self.plot}")
        return "\n".join(lines)


def searchable(manager: PluginManager, device: str, has_calibration: bool,
               backends: Sequence[str] | None, family: str | None = None) -> dict[str, list[Technique]]:
    """Techniques with a search space that can run here and apply to the model's family, by kind."""
    by_kind: dict[str, list[Technique]] = {kind: [] for kind in KINDS}
    for technique in manager.registry.techniques.values():
        if technique.search_space is None or technique.missing_packages():
            continue
        if family and technique.families and family not in technique.families:
            continue
        if backends and technique.backend not in backends:
            continue
        if "cuda" in technique.needs and not device.startswith("cuda"):
            continue
        if "calibration_data" in technique.needs and not has_calibration:
            continue
        by_kind[technique.kind].append(technique)
    return {kind: sorted(items, key=lambda t: t.name) for kind, items in by_kind.items() if items}


def default_study_name(model_path: Path, settings: dict[str, Any]) -> str:
    """model-opt-<model>-<hash of the model's path and the settings>: a later run with other settings, or on
    another model of the same name, starts its own study instead of resuming an unrelated one."""
    import hashlib

    key = json.dumps({"model": str(model_path.resolve()), **settings}, sort_keys=True)
    stem = re.sub(r"[^A-Za-z0-9._-]", "-", model_path.stem)[:40]
    return f"model-opt-{stem}-{hashlib.sha256(key.encode()).hexdigest()[:8]}"


def check_settings(study: Any, settings: dict[str, Any]) -> None:
    """A study's trials mean what its first run's settings made them mean: refuse other settings."""
    recorded = study.user_attrs.get("settings")
    if recorded is None:
        study.set_user_attr("settings", settings)
        return
    differ = [k for k in settings if recorded.get(k) != settings[k]]
    if differ:
        key = differ[0]
        raise UsageError(f"study {study.study_name!r} was run with {key} {recorded.get(key)!r}; this run asks for "
                         f"{settings[key]!r}", "pass another --study name (or none, for one named after these "
                         "settings)")


def counted(study: Any) -> list[Any]:
    """Finished trials that count against the budget (skipped proposals never ran)."""
    import optuna

    states = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
    return [t for t in study.get_trials(deepcopy=False, states=states) if "skipped" not in t.user_attrs]


def skip_reason(study: Any, trial: Any, steps: list[dict[str, Any]]) -> str | None:
    """Why a proposal is not run: no technique, a technique that failed structurally earlier in the study,
    or a configuration the study has already measured."""
    if not steps:
        return "no technique chosen"
    attrs = study.user_attrs
    for step in steps:
        name = f"{step['kind']}:{step['backend']}:{step['method']}"
        if f"cannot_apply:{name}" in attrs:
            return f"{name} cannot apply to this model ({attrs[f'cannot_apply:{name}'][:120]})"
    mine = {k: trial.user_attrs.get(k) for k in ("steps", "runtime", "recovery_steps")}
    for other in study.get_trials(deepcopy=False):
        if other.number != trial.number and {k: other.user_attrs.get(k) for k in mine} == mine and \
                "skipped" not in other.user_attrs and other.state.name in ("COMPLETE", "PRUNED", "RUNNING"):
            return f"the same configuration as trial {other.number}"
    return None


def describe(steps: list[dict[str, Any]], runtime: str = "eager", recovery: int = 0) -> str:
    if not steps:
        return "(none)"
    text = " + ".join(f"{s['backend']}:{s['method']}" + (
        f"({', '.join(f'{k}={v}' for k, v in s['options'].items())})" if s["options"] else "") for s in steps)
    return text + (f" + {recovery} recovery steps" if recovery else "") + (" [compiled]" if runtime == "compiled"
                                                                          else "")


def build_candidate(original: Any, steps: list[dict[str, Any]], recovery: int, runtime: str, job: Job,
                    context: TechniqueContext) -> tuple[Any, list[Any], Any]:
    """Apply ``steps`` to a copy of the original, fine-tune ``recovery`` steps with the test script's
    train() (pruned zeros kept), and compile it when ``runtime`` is compiled: (model, records, runnable)."""
    from .job import Step
    from .job import plan as plan_steps
    from .measure import compile_model
    from .pipeline import apply_with_recovery, split_for_recovery

    planned = plan_steps([Step(s["kind"], s["backend"], s["method"], s["options"]) for s in steps], job.manager)
    split = split_for_recovery(planned) if recovery else (planned, [])
    model, records = apply_with_recovery(copy.deepcopy(original), split, context, job, recovery)
    runnable = model
    if runtime == "compiled":
        try:
            runnable = compile_model(model, job.example)[0]
        except Exception as exc:
            raise TechniqueError(f"torch.compile failed on this candidate ({describe_error(exc)})",
                                 "keep it eager") from None
    return model, records, runnable


@dataclass(frozen=True)
class TuneSettings:
    """What the search does, beside the job's :class:`model_opt.job.Settings`."""

    trials: int = 20
    timeout: float | None = None
    objective: str = "latency"
    study: str | None = None
    storage: str | None = None
    backends: Sequence[str] | None = None
    recovery_steps: int = 100
    wait: bool = True

    def check(self) -> TuneSettings:
        if self.objective not in OBJECTIVES:
            raise UsageError(f"unknown objective {self.objective!r}", f"choose one of: {', '.join(OBJECTIVES)}")
        if self.trials < 1:
            raise UsageError(f"--trials is {self.trials}", "pass at least 1")
        if self.timeout is not None and not (math.isfinite(self.timeout) and self.timeout > 0):
            raise UsageError(f"--timeout is {self.timeout}", "pass a positive number of seconds, or leave it out")
        if self.study is not None:
            check_study_name(self.study)
        if self.storage and "://" in self.storage:
            check_url(self.storage)
        heartbeat_s(), grace_s()  # the environment's lease settings, checked before any work
        if self.recovery_steps < 0:
            raise UsageError(f"--recovery-steps is {self.recovery_steps}", "pass 0 (no recovery) or a positive number")
        return self


def autotune(model_path: str | os.PathLike[str], *, test_script: str | os.PathLike[str],
             dataset: str | os.PathLike[str], max_accuracy_drop: float, progress: Callable[[str], None] | None = None,
             manager: PluginManager | None = None, **settings: Any) -> TuneResult:
    """Search combinations of the installed techniques within ``max_accuracy_drop``; ``settings`` are
    :class:`TuneSettings` (trials, timeout, objective, study, storage, backends, recovery_steps, wait) and
    :class:`model_opt.job.Settings` (output, device, trust_model, input_shape)."""
    if max_accuracy_drop is None:
        raise UsageError("--max-accuracy-drop is required", "pass the largest metric drop you accept, e.g. 0.01")
    tune_names = {f.name for f in fields(TuneSettings)}
    tune = TuneSettings(**{k: v for k, v in settings.items() if k in tune_names}).check()
    job_settings = Settings.of({k: v for k, v in settings.items() if k not in tune_names}, "autotune")
    job = Job.prepare(model_path, test_script=test_script, dataset=dataset, progress=progress, manager=manager,
                      settings=replace(job_settings, max_accuracy_drop=max_accuracy_drop))
    check_space(job, tune, family=None)
    original = job.load()
    if job.example is None:
        raise UsageError("autotune needs an example input to time candidates",
                         "define example_input(dataset_path) in the test script or pass --input-shape")
    space = check_space(job, tune, family=detect_family(original)[0])
    baseline = measure_baseline(job, tune.objective)
    recorded = {"objective": tune.objective, "max_accuracy_drop": max_accuracy_drop, "device": job.device,
                "backends": sorted(tune.backends or []), "higher_is_better": job.script.higher_is_better,
                "recovery_steps": tune.recovery_steps}
    name = tune.study or default_study_name(job.model_path, recorded)
    directions = ["minimize", "minimize"] if tune.objective == "both" else ["minimize"]
    study, storage_label = open_study(tune.storage, job.output.with_name(f"{name}.journal"), name, directions)
    check_settings(study, recorded)
    expired = expire_dead_trials(study)
    if expired:
        job.say(f"{_trials(expired)} left running by a worker that died: failed and queued again")
    seed_recommendations(study, original, job.device, space, job.manager)
    context = job.context()
    search(study, Objective(job, context, space, baseline, tune), tune, job.say)
    return finish(study, storage_label, baseline, tune.objective, job, context)


def check_space(job: Job, tune: TuneSettings, family: str | None) -> dict[str, list[Technique]]:
    """The searchable techniques; refuse an unknown --backends name, and a search in which none could make the
    model faster."""
    from .registry import choose_one_of

    known = {t.backend for t in job.manager.registry.techniques.values() if t.search_space is not None}
    for backend in tune.backends or []:
        if backend not in known:
            raise choose_one_of("--backends name", backend, known)
    space = searchable(job.manager, job.device, job.script.has("calibration_data"), tune.backends, family)
    if any(t.speeds_up or t.speeds_up_compiled or t.speeds_up_with for items in space.values() for t in items):
        return space
    if family is None:
        raise UsageError("no technique plugin is installed for the tuner to search that can make a model faster "
                         "(see 'speeds up on' in model-opt techniques)", 'pip install "model-opt[all]"')
    raise UsageError(f"no installed technique that the tuner searches applies to this {family} model",
                     'see model-opt recommend for what fits it, and pip install "model-opt[all]"')


def measure_baseline(job: Job, objective: str = "latency") -> Baseline:
    """The original's metric, latency, size and parameters (and decode tokens/s for that objective); a budget
    larger than the metric is refused."""
    original, budget = job.model, job.max_accuracy_drop
    job.say("measuring the baseline")
    metrics = job.script.evaluate(original, job.dataset, job.device)
    baseline = Baseline(metrics.value, model_latency(original, job.example, job.device).median_ms,
                        state_dict_bytes(original), count_parameters(original)[0],
                        metrics.values.get(DECODE_METRIC))
    if objective == "tokens-per-second" and not baseline.decode_tokens_per_s:
        raise UsageError(f"--objective tokens-per-second reads {DECODE_METRIC} from the evaluation, and "
                         f"{job.script.path.name} reports no such metric",
                         f"give a causal LM without --test-script (the built-in evaluation), or return "
                         f"{DECODE_METRIC} from evaluate()")
    if budget is not None and budget > abs(baseline.metric) > 0:
        raise UsageError(f"--max-accuracy-drop {budget:g} is larger than the metric itself "
                         f"({baseline.metric:.4f}), which would accept any model",
                         "pass a drop in the metric's own units, e.g. 0.01 for one accuracy point")
    return baseline


class Objective:
    """One trial: propose techniques (and runtime, recovery), skip repeats, build, evaluate and time."""

    def __init__(self, job: Job, context: TechniqueContext, space: dict[str, list[Technique]], baseline: Baseline,
                 tune: TuneSettings) -> None:
        self.job, self.context, self.space, self.baseline, self.tune = job, context, space, baseline, tune
        kind = job.device.split(":")[0]
        # The runtime is part of the search where a candidate technique is fast only compiled; recovery
        # fine-tuning where the test script can train.
        self.compiled = {t.name for items in space.values() for t in items if kind in t.speeds_up_compiled}
        self.runtimes = ["eager", "compiled"] if self.compiled else ["eager"]
        self.recoveries = [0, tune.recovery_steps] if tune.recovery_steps and job.script.has("train") else [0]

    def propose(self, trial: Any) -> tuple[list[dict[str, Any]], str, int]:
        steps = []
        for kind in KINDS:
            techniques = self.space.get(kind, [])
            choice = trial.suggest_categorical(kind, ["none", *[t.name for t in techniques]]) if techniques else "none"
            if choice == "none":
                continue
            technique = next(t for t in techniques if t.name == choice)
            options = {name: trial.suggest_categorical(f"{technique.name}.{name}", list(values))
                       for name, values in (technique.search_space or {}).items()}
            steps.append({"kind": kind, "backend": technique.backend, "method": technique.method, "options": options})
        runtime = trial.suggest_categorical("runtime", self.runtimes) if len(self.runtimes) > 1 else "eager"
        recovery = trial.suggest_categorical("recovery_steps", self.recoveries) if len(self.recoveries) > 1 else 0
        if not any(s["kind"] in RECOVERABLE_KINDS for s in steps):
            recovery = 0  # recovery fine-tuning repairs pruning and decomposition
        if not any(f"{s['kind']}:{s['backend']}:{s['method']}" in self.compiled for s in steps):
            runtime = "eager"  # compiling helps only techniques that are fast compiled
        return steps, runtime, recovery

    def __call__(self, trial: Any) -> Any:
        import optuna

        steps, runtime, recovery = self.propose(trial)
        for key, value in (("steps", steps), ("runtime", runtime), ("recovery_steps", recovery),
                           ("description", describe(steps, runtime, recovery)), ("worker", worker_id())):
            trial.set_user_attr(key, value)
        skip = skip_reason(trial.study, trial, steps)
        if skip:  # never run: it does not count against the budget
            trial.set_user_attr("skipped", skip)
            raise optuna.TrialPruned(skip)
        job = self.job
        try:
            with lease(trial):
                candidate, records, runnable = build_candidate(job.model, steps, recovery, runtime, job,
                                                               self.context)
                metric, speedup = self.measure(candidate, records, runnable, runtime)
                size = state_dict_bytes(candidate)
        except Exception as exc:  # a candidate that fails is evidence, not the end of the study
            if not isinstance(exc, ModelOptError):
                exc = TechniqueError(f"{describe(steps, runtime, recovery)} failed ({describe_error(exc)})")
            trial.set_user_attr("error", str(exc))
            failed = getattr(exc, "technique", None)
            if isinstance(exc, TechniqueError) and failed:  # structural: drop it from the rest of the study
                trial.study.set_user_attr(f"cannot_apply:{failed}", str(exc)[:300])
            raise optuna.TrialPruned(str(exc)) from None
        return self.record(trial, metric, speedup, size)

    def measure(self, candidate: Any, records: list[Any], runnable: Any, runtime: str) -> tuple[float, float]:
        """The candidate's primary metric and its speed-up: the original's latency over the candidate's, timed
        as ``optimize`` times them (each as deployed, :func:`model_opt.pipeline.time_against_original`), or
        for ``tokens-per-second`` its decode tokens/s over the original's (float, eager)."""
        job = self.job
        if self.tune.objective == "tokens-per-second":
            metric, tokens = decode_rate(job, candidate, runtime == "compiled")
            return metric, tokens / (self.baseline.decode_tokens_per_s or tokens)
        metric = job.script.evaluate(candidate, job.dataset, job.device).value
        compiled = runnable if runtime == "compiled" else None
        before, after, _ = time_against_original(job, job.model, candidate, records, compiled,
                                                 say=lambda message: None)
        return metric, before.median_ms / after.median_ms

    def record(self, trial: Any, metric: float, speedup: float, size: int) -> Any:
        """Store the trial's measurements; return Optuna's objective value(s)."""
        budget, baseline = self.job.max_accuracy_drop, self.baseline
        drop = (1.0 if self.job.script.higher_is_better else -1.0) * (baseline.metric - metric)
        size_ratio = size / baseline.size_bytes if baseline.size_bytes else 1.0
        for key, value in (("metric", metric), ("drop", drop), ("speedup", speedup), ("size_ratio", size_ratio),
                           ("within_budget", drop <= budget + 1e-12)):
            trial.set_user_attr(key, value)
        trial.set_constraint("metric_drop_over_budget", drop - budget)
        objective = self.tune.objective
        values = {"size": [size_ratio], "both": [1 / speedup, size_ratio]}.get(objective, [1 / speedup])
        return values[0] if len(values) == 1 else values


def decode_rate(job: Job, model: Any, compiled: bool) -> tuple[float, float]:
    """(primary metric, decode tokens/s) of ``model`` from the evaluation, its decode compiled when asked."""
    script = job.script
    was, script.compiled = script.compiled, compiled
    try:
        metrics = script.evaluate(model, job.dataset, job.device)
    finally:
        script.compiled = was
    tokens = metrics.values.get(f"{DECODE_METRIC}_compiled" if compiled else DECODE_METRIC)
    if not tokens:
        raise TechniqueError("the evaluation reported no decode tokens/s for this candidate (it cannot "
                             "generate, e.g. OpenVINO int8_static)", "search other techniques (--backends)")
    return metrics.value, tokens


def search(study: Any, objective: Objective, tune: TuneSettings, say: Callable[[str], None]) -> None:
    """Run trials until the study has ``tune.trials`` counted ones (or the timeout), reporting each."""
    started = time.time()
    done_before = len(counted(study))
    if done_before:
        say(f"resuming study {study.study_name!r}: {done_before} finished trials kept")
    eta = Eta(tune.trials, done_before, tune.timeout)

    def report_progress(study_: Any, trial: Any) -> None:
        finished = counted(study_)
        if len(finished) >= tune.trials:
            study_.stop()
        if "skipped" in trial.user_attrs:
            say(f"skipped a proposal: {trial.user_attrs['skipped']}")
            return
        feasible = [t for t in finished if t.user_attrs.get("within_budget")]
        best = max((t.user_attrs["speedup"] for t in feasible), default=None)
        attrs = trial.user_attrs
        result = (f"error: {attrs['error']}" if "error" in attrs else
                  f"metric {attrs['metric']:.4f} ({'within budget' if attrs['within_budget'] else 'over budget'}), "
                  f"{speed_text(attrs['speedup'])}, size {attrs['size_ratio']:.2f}x")
        say(f"[{len(finished)}/{tune.trials}] {attrs.get('description')} -> {result} | best within budget: "
            f"{f'{best:.2f}x' if best else '-'} | {eta.text(len(finished))}")

    def run_more(count: int) -> None:  # skipped proposals do not count; the cap stops a repeating sampler
        left = None if tune.timeout is None else tune.timeout - (time.time() - started)
        if left is None or left > 0:
            study.optimize(objective, n_trials=count * 4, timeout=left, gc_after_trial=True,
                           callbacks=[report_progress])

    remaining = max(0, tune.trials - done_before)
    if remaining:
        run_more(remaining)
    if tune.timeout is None or time.time() - started < tune.timeout:
        settle(study, tune.trials, run_more, say, tune.wait)


class Eta:
    """Time left, from the mean time per finished trial, smoothed (it moves at most a third per trial)."""

    def __init__(self, trials: int, done_before: int, timeout: float | None) -> None:
        self.trials, self.done_before, self.timeout = trials, done_before, timeout
        self.started, self.shown = time.time(), None

    def text(self, finished: int) -> str:
        elapsed = time.time() - self.started
        left = elapsed / max(1, finished - self.done_before) * max(0, self.trials - finished)
        if self.shown is not None and left > 0:
            left = min(max(left, self.shown * 2 / 3), self.shown * 4 / 3)
        if self.timeout:
            left = min(left, max(0.0, self.timeout - elapsed))
        self.shown = left
        return f"~{left:.0f}s left"


def _trials(numbers: list[int]) -> str:
    return f"trial {numbers[0]} was" if len(numbers) == 1 else f"trials {', '.join(map(str, numbers))} were"


def settle(study: Any, trials: int, run_more: Callable[[int], None], say: Callable[[str], None],
           wait: bool) -> None:
    """Leave the study with ``trials`` counted trials and none RUNNING: wait for other workers' running trials
    until they finish or their worker goes silent (then they are failed, and what the budget still needs runs
    here). Without ``wait``, stop once this worker's share is done."""
    import optuna

    announced: set[int] = set()
    while True:
        expired = expire_dead_trials(study)
        if expired:
            say(f"{_trials(expired)} left running by a worker that died: failed and queued again")
        running = sorted(t.number for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)))
        done = len(counted(study))
        need = trials - done - len(running)
        if need > 0:
            run_more(need)
            if len(counted(study)) > done:
                continue
            return  # nothing more could run (time is up, or the sampler only repeats itself)
        if not running or not wait:
            return
        if set(running) != announced:
            say(f"waiting for trial{'s' if len(running) > 1 else ''} {', '.join(map(str, running))} running in "
                f"another worker: it finishes, or is failed once its worker is silent for {grace_s()}s and rerun "
                "here (--no-wait stops now)")
            announced = set(running)
        time.sleep(min(2, heartbeat_s()))


def seed_recommendations(study: Any, model: Any, device: str, space: dict[str, list[Technique]],
                         manager: PluginManager) -> None:
    """Start from the recommendation: enqueue its techniques (those the search space has) once per study."""
    if study.user_attrs.get("seeded") or study.get_trials(deepcopy=False):
        return
    study.set_user_attr("seeded", True)
    _, _, plan = recommend(model, device, manager)
    names = {t.name for items in space.values() for t in items}
    for item in plan:
        name = f"{item.kind}:{item.backend}:{item.method}"
        if not item.available or name not in names:
            continue
        technique = manager.registry.techniques[(item.kind, item.backend, item.method)]
        params: dict[str, Any] = {kind: "none" for kind in space}
        params[item.kind] = name
        for option, values in (technique.search_space or {}).items():
            wanted = item.options.get(option)
            params[f"{name}.{option}"] = wanted if wanted in values else values[0]
        study.enqueue_trial(params, skip_if_exists=True)


def pareto_front(rows: list[dict[str, Any]], higher_is_better: bool = True) -> list[dict[str, Any]]:
    """Rows not dominated on (metric drop, latency, size)."""
    def better_or_equal(a: dict, b: dict) -> bool:
        return a["drop"] <= b["drop"] and a["speedup"] >= b["speedup"] and a["size_ratio"] <= b["size_ratio"]

    front = []
    for row in rows:
        dominated = any(better_or_equal(other, row) and other is not row and (
            other["drop"] < row["drop"] or other["speedup"] > row["speedup"] or other["size_ratio"] < row["size_ratio"])
            for other in rows)
        if not dominated:
            front.append(row)
    return sorted(front, key=lambda r: -r["speedup"])


def trial_rows(study: Any, budget: float) -> list[dict[str, Any]]:
    """Every trial that ran, numbered as the user counts them (skipped proposals never ran; Optuna's own
    number is kept for its tools), with its measurements or its error."""
    import optuna

    rows = []
    for trial in study.get_trials(deepcopy=False):
        attrs = trial.user_attrs
        if "skipped" in attrs or trial.state == optuna.trial.TrialState.WAITING:  # skipped, or enqueued, never run
            continue
        row = {"number": len(rows) + 1, "optuna_number": trial.number, "state": trial.state.name,
               "description": attrs.get("description", ""),
               "steps": attrs.get("steps", []), "runtime": attrs.get("runtime", "eager"),
               "recovery_steps": attrs.get("recovery_steps", 0), "worker": attrs.get("worker")}
        if trial.state == optuna.trial.TrialState.COMPLETE:
            row.update({k: attrs[k] for k in ("metric", "drop", "speedup", "size_ratio")})
            row["within_budget"] = attrs["drop"] <= budget + 1e-12  # this run's budget, also on a resumed study
        elif "error" in attrs:
            row["error"] = attrs["error"]
        rows.append(row)
    return rows


def finish(study: Any, storage: str, baseline: Baseline, objective: str, job: Job,
           context: TechniqueContext) -> TuneResult:
    """Choose the best candidate within budget (the top three re-measured against the original), save it
    with its report and plot; no candidate within budget raises AccuracyBudgetExceeded."""
    budget = job.max_accuracy_drop
    rows = trial_rows(study, budget)
    measured = [r for r in rows if "metric" in r]
    feasible = [r for r in measured if r["within_budget"]]
    result = TuneResult(study.study_name, storage, baseline, rows, pareto_front(feasible), None, objective=objective)
    if not feasible:
        closest = min(measured, key=lambda r: r["drop"]) if measured else None
        detail = (f"; the closest was trial {closest['number']} ({closest['description']}) with a drop of "
                  f"{closest['drop']:.4f}" if closest else "")
        raise AccuracyBudgetExceeded(f"no candidate stayed within --max-accuracy-drop {budget:g} after "
                                     f"{len(rows)} trials{detail}; nothing was saved",
                                     "allow a larger drop, more trials, or other techniques", report=result)
    key = {"size": lambda r: (r["size_ratio"], r["drop"]),
           "both": lambda r: (r["size_ratio"] / r["speedup"], r["drop"])}.get(objective, lambda r: (-r["speedup"],
                                                                                                  r["drop"]))
    # One trial's timing is noisy on a shared machine: re-apply the top candidates and time them against
    # the original in interleaved rounds before choosing.
    finalists = sorted(feasible, key=key)[:3]
    job.say(f"re-measuring the top {len(finalists)} candidates against the original")
    built = {row["number"]: build_candidate(job.model, row["steps"], row["recovery_steps"], row["runtime"], job,
                                            context) for row in finalists}
    if objective == "tokens-per-second":  # the original decoded again first: a baseline of the same moment
        original_rate = decode_rate(job, job.model, False)[1]
        for row in finalists:
            model, _, _ = built[row["number"]]
            row["remeasured_speedup"] = decode_rate(job, model, row["runtime"] == "compiled")[1] / original_rate
    else:  # each against the original with the routine optimize and the trials use
        for row in finalists:
            model, records, runnable = built[row["number"]]
            before, after, _ = time_against_original(job, job.model, model, records,
                                                     runnable if runnable is not model else None,
                                                     say=lambda message: None)
            row["remeasured_speedup"] = before.median_ms / after.median_ms
    if objective != "size":
        finalists.sort(key=lambda r: (-r["remeasured_speedup"] / (r["size_ratio"] if objective == "both" else 1),
                                      r["drop"]))
    result.best = finalists[0]
    if result.best["remeasured_speedup"] < 1.0 and objective != "size":
        result.warnings.append(f"no candidate within budget was faster than the original on {job.device}")
    save_best(job, result, built[result.best["number"]], measured)
    return result


def save_best(job: Job, result: TuneResult, candidate: tuple[Any, list, Any], measured: list[dict[str, Any]]) -> None:
    """Write the best candidate, its Pareto plot and the report together."""
    best, out = result.best, job.output
    job.say(f"saving the best candidate (trial {best['number']})")
    model, records, _ = candidate
    if best["runtime"] == "compiled":
        result.warnings.append("the best candidate was measured under torch.compile with inductor freezing: run it "
                               "that way (torch._inductor.config.freezing = True; torch.compile(model))")
    result.output = str(out)
    with output_lock(out):  # the side files first, so that the recipe lists them (all appear together)
        result.plot = plot(measured, result.pareto, best, side_path(out, ".pareto.png", job.folder),
                           job.max_accuracy_drop)
        report = write_text_atomic(report_path(out, job.folder), redact(dumps(result.to_dict())))
        job.save(model, records, {"autotune": {"study": result.study, "trial": best["number"],
                                               "optuna_trial": best["optuna_number"], "storage": result.storage}},
                 files=[result.plot, report])


def plot(measured: list[dict[str, Any]], front: list[dict[str, Any]], best: dict[str, Any], path: Path,
         budget: float) -> str:
    """Metric drop against speed-up; marker area is the size ratio; the Pareto front is joined."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(7, 4.5))
    for within, color, label in ((True, "tab:green", "within budget"), (False, "tab:red", "over budget")):
        rows = [r for r in measured if r["within_budget"] == within]
        axes.scatter([r["speedup"] for r in rows], [r["drop"] for r in rows],
                     s=[40 + 200 * r["size_ratio"] for r in rows], c=color, alpha=0.6, label=label)
    for row in measured:  # each point: its trial number and techniques
        label = f"{row['number']}: {row['description']}"
        axes.annotate(label if len(label) <= 40 else label[:39] + "...", (row["speedup"], row["drop"]), fontsize=6,
                      xytext=(3, 3), textcoords="offset points", alpha=0.8)
    axes.plot([r["speedup"] for r in front], [r["drop"] for r in front], "k--", lw=1, label="Pareto front")
    speed = best.get("remeasured_speedup", best["speedup"])  # the one figure the summary gives
    axes.scatter([speed], [best["drop"]], marker="*", s=300, c="gold", edgecolors="k",
                 label=f"best: trial {best['number']}, {speed:.2f}x (re-measured)")
    axes.set_xscale("log")  # slow-downs and speed-ups get the same room
    axes.axvline(1.0, color="grey", lw=0.8)
    axes.axhline(budget, color="tab:red", lw=1, ls=":", label=f"budget ({budget:g})")
    axes.set_xlabel("speed-up over the original (x, log scale)")
    axes.set_ylabel("metric drop (metric units)")
    axes.set_title("model-opt autotune: marker area = size ratio")
    axes.legend(loc="best", fontsize=8)
    figure.tight_layout()
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png", dpi=100)
    plt.close(figure)
    return str(path)
