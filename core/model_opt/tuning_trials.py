"""The tuner's trials: what the search does (:class:`TuneSettings`), the original's figures it compares against
(:class:`Baseline`), each trial proposed, skipped when it repeats or cannot apply, built on a fresh copy, evaluated
and timed against the original as deployed; the search loop that leaves a shared study with exactly ``--trials``
trials and none running."""

from __future__ import annotations

import copy
import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from .compare import time_against_original
from .context import TechniqueContext
from .errors import ModelOptError, TechniqueError, UsageError
from .errors import describe as describe_error
from .job import Job
from .measure import compile_model, state_dict_bytes
from .plugins import PluginManager
from .recommend import recommend
from .redaction import check_url
from .registry import KINDS, Technique, step_name
from .report import speed_text
from .steps import RECOVERABLE_KINDS, Step, apply_with_recovery, check, plan, split_for_recovery
from .tuning_storage import check_study_name, expire_dead_trials, grace_s, heartbeat_s, lease, worker_id

#: How many of the most sensitive layer groups a trial may keep in float (a quantizer with an ``exclude`` option).
KEEP_FLOAT = (0, 1, 2)

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
    include_slow: bool = False

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
        name = step_name(step)
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
        f"({', '.join(_option_text(k, v) for k, v in s['options'].items())})" if s["options"] else "") for s in steps)
    return text + (f" + {recovery} recovery steps" if recovery else "") + (" [compiled]" if runtime == "compiled"
                                                                          else "")


def _option_text(name: str, value: Any) -> str:
    """``name=value``; a long exclude list (the layers of sensitive groups kept in float) as its count."""
    if name == "exclude" and isinstance(value, list) and len(value) > 2:
        return f"exclude={len(value)} layers"
    return f"{name}={value}"


def build_candidate(original: Any, steps: list[dict[str, Any]], recovery: int, runtime: str, job: Job,
                    context: TechniqueContext) -> tuple[Any, list[Any], Any]:
    """Apply ``steps`` to a copy of the original, fine-tune ``recovery`` steps with the test script's
    train() (pruned zeros kept), and compile it when ``runtime`` is compiled: (model, records, runnable)."""
    planned = plan([Step(s["kind"], s["backend"], s["method"], s["options"]) for s in steps], job.manager)
    check(original, planned, context)
    split = split_for_recovery(planned) if recovery else (planned, [])
    model, records = apply_with_recovery(copy.deepcopy(original), split, context, job.manager, recovery)
    runnable = model
    if runtime == "compiled":
        try:
            runnable = compile_model(model, job.example)[0]
        except Exception as exc:
            raise TechniqueError(f"torch.compile failed on this candidate ({describe_error(exc)})",
                                 "keep it eager") from None
    return model, records, runnable


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
        self.rankings: dict[str, list[Any]] = {}  # technique and options -> layer groups, most sensitive first

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
            if kind == "quantize" and any(option.name == "exclude" for option in technique.options):
                keep = trial.suggest_categorical(f"{technique.name}.keep_float", list(KEEP_FLOAT))
                layers = self.most_sensitive(technique, options, keep) if keep else []
                if layers:
                    options["exclude"] = layers
            steps.append({"kind": kind, "backend": technique.backend, "method": technique.method, "options": options})
        runtime = trial.suggest_categorical("runtime", self.runtimes) if len(self.runtimes) > 1 else "eager"
        recovery = trial.suggest_categorical("recovery_steps", self.recoveries) if len(self.recoveries) > 1 else 0
        if not any(s["kind"] in RECOVERABLE_KINDS for s in steps):
            recovery = 0  # recovery fine-tuning repairs pruning and decomposition
        if not any(step_name(s) in self.compiled for s in steps):
            runtime = "eager"  # compiling helps only techniques that are fast compiled
        return steps, runtime, recovery

    def most_sensitive(self, technique: Technique, options: dict[str, Any], count: int) -> list[str]:
        """The layers of the ``count`` groups of the original where ``technique`` alone costs the most accuracy
        (``model-opt sensitivity``'s ranking: measured once per technique and options, then cached); none when the
        groups cannot be ranked (the trial then quantizes every layer)."""
        from .sensitivity import ranking

        key = json.dumps([technique.name, options], sort_keys=True, default=str)
        if key not in self.rankings:
            self.job.progress(f"ranking the layer groups by what {technique.label} costs in each, for mixes that "
                              "keep the most sensitive in float")
            try:
                self.rankings[key] = ranking(self.job, self.job.model, technique, technique.resolve_options(options),
                                             self.context, self.baseline.metric, self.job.progress)
            except ModelOptError as exc:
                self.job.progress(f"{technique.label}: no layer groups ranked ({exc.problem}); its trials quantize "
                                  "every layer")
                self.rankings[key] = []
        return sorted({name for group in self.rankings[key][:count] for name in group.layers})

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
        as ``optimize`` times them (each as deployed, :func:`model_opt.compare.time_against_original`), or
        for ``tokens-per-second`` its decode tokens/s over the original's (float, eager)."""
        job = self.job
        if self.tune.objective == "tokens-per-second":
            metric, tokens = decode_rate(job, candidate, runtime == "compiled")
            return metric, tokens / (self.baseline.decode_tokens_per_s or tokens)
        compiled = runnable if runtime == "compiled" else None
        metric = job.script.evaluate(job.script.as_deployed(candidate, compiled), job.dataset, job.device).value
        timed = time_against_original(job, job.model, candidate, records, compiled, progress=lambda message: None)
        return metric, timed.before.median_ms / timed.after.median_ms

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


def search(study: Any, objective: Objective, tune: TuneSettings, progress: Callable[[str], None]) -> None:
    """Run trials until the study has ``tune.trials`` counted ones (or the timeout), reporting each."""
    started = time.time()
    done_before = len(counted(study))
    if done_before:
        progress(f"resuming study {study.study_name!r}: {done_before} finished trials kept")
    eta = Eta(tune.trials, done_before, tune.timeout)

    def report_progress(study_: Any, trial: Any) -> None:
        finished = counted(study_)
        if len(finished) >= tune.trials:
            study_.stop()
        if "skipped" in trial.user_attrs:
            progress(f"skipped a proposal: {trial.user_attrs['skipped']}")
            return
        feasible = [t for t in finished if t.user_attrs.get("within_budget")]
        best = max((t.user_attrs["speedup"] for t in feasible), default=None)
        attrs = trial.user_attrs
        result = (f"error: {attrs['error']}" if "error" in attrs else
                  f"metric {attrs['metric']:.4f} ({'within budget' if attrs['within_budget'] else 'over budget'}), "
                  f"{speed_text(attrs['speedup'])}, size {attrs['size_ratio']:.2f}x")
        progress(f"[{len(finished)}/{tune.trials}] {attrs.get('description')} -> {result} | best within budget: "
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
        settle(study, tune.trials, run_more, progress, tune.wait)


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


def trials_were(numbers: list[int]) -> str:
    """"trial 3 was" or "trials 3, 4 were"."""
    return f"trial {numbers[0]} was" if len(numbers) == 1 else f"trials {', '.join(map(str, numbers))} were"


def settle(study: Any, trials: int, run_more: Callable[[int], None], progress: Callable[[str], None],
           wait: bool) -> None:
    """Leave the study with ``trials`` counted trials and none RUNNING: wait for other workers' running trials
    until they finish or their worker goes silent (then they are failed, and what the budget still needs runs
    here). Without ``wait``, stop once this worker's share is done."""
    import optuna

    announced: set[int] = set()
    while True:
        expired = expire_dead_trials(study)
        if expired:
            progress(f"{trials_were(expired)} left running by a worker that died: failed and queued again")
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
            progress(f"waiting for trial{'s' if len(running) > 1 else ''} {', '.join(map(str, running))} running in "
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
    _, _, recommendations = recommend(model, device, manager)
    names = {t.name for items in space.values() for t in items}
    for recommended in recommendations:
        technique = recommended.technique
        if not recommended.available or technique.name not in names:
            continue
        params: dict[str, Any] = {kind: "none" for kind in space}
        params[technique.kind] = technique.name
        for option, values in (technique.search_space or {}).items():
            wanted = recommended.options.get(option)
            params[f"{technique.name}.{option}"] = wanted if wanted in values else values[0]
        if technique.kind == "quantize" and any(option.name == "exclude" for option in technique.options):
            params[f"{technique.name}.keep_float"] = 0  # (the recommendation as it is: every layer)
        study.enqueue_trial(params, skip_if_exists=True)


