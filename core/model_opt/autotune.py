"""Measured, accuracy-budgeted search over every installed technique, on Optuna storage.

Every candidate is applied to a fresh copy of the model, evaluated with the user's metric and timed on
the same device and thread count as the baseline; candidates over the budget are kept as evidence.
Workers on many machines can share one study through any Optuna storage URL. The trials are
:mod:`model_opt.tuning_trials`, the result :mod:`model_opt.tuning_result`, the storage
:mod:`model_opt.tuning_storage`.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import fields, replace
from pathlib import Path
from typing import Any

from .errors import UsageError
from .job import Job, Settings
from .measure import count_parameters, model_latency, state_dict_bytes
from .plugins import PluginManager
from .registry import KINDS, Technique, choose_one_of
from .tuning_result import TuneResult, finish
from .tuning_storage import expire_dead_trials, open_study
from .tuning_trials import (
    DECODE_METRIC,
    Baseline,
    Objective,
    TuneSettings,
    search,
    seed_recommendations,
    trials_were,
)


def searchable(manager: PluginManager, device: str, has_calibration: bool,
               backends: Sequence[str] | None, family: str | None = None,
               include_slow: bool = False) -> dict[str, list[Technique]]:
    """Techniques with a search space that can run here, apply to the model's family and (unless ``include_slow``)
    are not slow on this device, by kind."""
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
        if not include_slow and technique.slow_here(device, family):
            continue
        by_kind[technique.kind].append(technique)
    return {kind: sorted(items, key=lambda t: t.name) for kind, items in by_kind.items() if items}


def default_study_name(model_path: Path, settings: dict[str, Any]) -> str:
    """model-opt-<model>-<hash of the model's path and the settings>: a later run with other settings, or on
    another model of the same name, starts its own study instead of resuming an unrelated one."""
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
    space = check_space(job, tune, family=job.family)
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
        job.progress(f"{trials_were(expired)} left running by a worker that died: failed and queued again")
    seed_recommendations(study, original, job.device, space, job.manager)
    context = job.context()
    search(study, Objective(job, context, space, baseline, tune), tune, job.progress)
    return finish(study, storage_label, baseline, tune.objective, job, context)


def check_space(job: Job, tune: TuneSettings, family: str | None) -> dict[str, list[Technique]]:
    """The searchable techniques; refuse an unknown --backends name, and a search in which none could make the
    model faster."""
    known = {t.backend for t in job.manager.registry.techniques.values() if t.search_space is not None}
    for backend in tune.backends or []:
        if backend not in known:
            raise choose_one_of("--backends name", backend, known)
    space = searchable(job.manager, job.device, job.script.has("calibration_data"), tune.backends, family,
                       tune.include_slow)
    slow = sorted({t.label for t in job.manager.registry.techniques.values() if t.search_space is not None
                   and t.slow_here(job.device, family) and (not tune.backends or t.backend in tune.backends)})
    if slow and not tune.include_slow and family is not None:
        job.progress(f"not searched, slow on this device: {', '.join(slow)} (--include-slow searches them too)")
    if any(t.speeds_up or t.speeds_up_compiled or t.speeds_up_with for items in space.values() for t in items):
        return space
    if slow and not tune.include_slow:
        raise UsageError(f"every technique the tuner could search here is slow on this device: {', '.join(slow)}",
                         "rerun with --include-slow to search them anyway, or on a machine they are fast on "
                         "(see model-opt recommend)")
    if family is None:
        raise UsageError("no technique plugin is installed for the tuner to search that can make a model faster "
                         "(see 'speeds up on' in model-opt techniques)", 'pip install "model-opt[all]"')
    raise UsageError(f"no installed technique that the tuner searches applies to this {family} model",
                     'see model-opt recommend for what fits it, and pip install "model-opt[all]"')


def measure_baseline(job: Job, objective: str = "latency") -> Baseline:
    """The original's metric, latency, size and parameters (and decode tokens/s for that objective); a budget
    larger than the metric is refused."""
    original, budget = job.model, job.max_accuracy_drop
    job.progress("measuring the baseline")
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


