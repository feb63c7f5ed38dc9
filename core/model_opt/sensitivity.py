"""Which layers cost accuracy: a technique applied to one group of layers at a time (a transformer block, a conv
stage, the embedding, the head; every layer on its own in a small model), scored with the user's own metric and
ranked by the drop each causes alone. ``optimize --max-accuracy-drop`` keeps the most sensitive groups unchanged,
in that order, until the metric is within the budget (:func:`keep_sensitive_float`), then as few of the layers
inside them as still meet it, ranked the same way (:func:`fewest_kept`).

A group is applied through the technique's own ``exclude`` option (every other layer excluded), so any technique
that has one can be measured this way; the result is cached per model, technique, options and groups.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from .errors import AccuracyBudgetExceeded, TechniqueError, UsageError
from .registry import Technique

#: A model with at most this many quantizable layers is measured layer by layer.
LAYERWISE_UP_TO = 12


@dataclass
class Group:
    """Layers measured together: their common name and the layers (module names) in it."""

    name: str
    layers: list[str]


@dataclass
class Sensitivity:
    """One group's cost: the metric with only this group changed, and the drop from the original's."""

    group: str
    layers: list[str]
    metric: float
    drop: float


def quantizable(model: Any) -> list[str]:
    """Names of the layers a quantizer or pruner changes: Linear, convolutions, embeddings."""
    from torch import nn

    kinds = (nn.Linear, nn.modules.conv._ConvNd, nn.Embedding)
    return [name for name, module in model.named_modules() if name and isinstance(module, kinds)]


def layer_groups(model: Any) -> list[Group]:
    """The model's layers in groups: each block of its longest repeated stack (transformer blocks, conv stages),
    then what lies outside it by the top-level module holding it (the embedding, the head); a small model layer by
    layer."""
    from torch import nn

    layers = quantizable(model)
    if len(layers) <= LAYERWISE_UP_TO:
        return [Group(name, [name]) for name in layers]

    def holds(prefix: str) -> list[str]:
        return [n for n in layers if n == prefix or n.startswith(f"{prefix}.")]

    stacks = [(name, module) for name, module in model.named_modules() if name and isinstance(
        module, (nn.ModuleList, nn.Sequential))]
    trunk, blocks = None, []
    for name, module in stacks:
        children = [f"{name}.{child}" for child, _ in module.named_children()]
        filled = [child for child in children if holds(child)]
        if len(filled) >= 2 and len(filled) > len(blocks):
            trunk, blocks = name, filled
    groups = [Group(block, holds(block)) for block in blocks]
    inside = {n for group in groups for n in group.layers}
    outside: dict[str, list[str]] = {}
    for name in layers:
        if name in inside:
            continue
        parts = name.split(".")
        # the shortest prefix that is not an ancestor of the trunk (the embedding, the norm, the head)
        key = next((".".join(parts[:i]) for i in range(1, len(parts) + 1)
                    if not (trunk and (trunk == ".".join(parts[:i]) or trunk.startswith(".".join(parts[:i]) + ".")))),
                   name)
        outside.setdefault(key, []).append(name)
    return groups + [Group(name, names) for name, names in outside.items()]


def within(groups: Sequence[Group], names: Sequence[str]) -> list[Group]:
    """The groups named ``names`` (a group's name, or one of its layers as a group of its own)."""
    found = []
    for name in names:
        match = next((g for g in groups if g.name == name), None) or next(
            (Group(name, [name]) for g in groups if name in g.layers), None)
        if match is None:
            raise UsageError(f"{name!r} names no layer group of the model",
                             f"choose one of: {', '.join(g.name for g in groups)}")
        found.append(match)
    return found


def check_technique(technique: Technique) -> None:
    """Only a technique with an ``exclude`` option can be applied to one group at a time."""
    if not any(option.name == "exclude" for option in technique.options):
        raise UsageError(f"{technique.label} has no exclude option, so it cannot be applied to one group of layers "
                         "at a time", "choose a technique that has one (see model-opt techniques)")


def cache_key(model_path: Path, technique: Technique, options: dict[str, Any], groups: Sequence[Group],
              fraction: float) -> str:
    """What a cached measurement is valid for: the model file (its size and time), the technique, its options,
    the groups and the share of the data evaluated."""
    stat = model_path.stat()
    key = json.dumps({"model": str(model_path.resolve()), "size": stat.st_size, "mtime": stat.st_mtime_ns,
                      "technique": technique.name, "options": options, "groups": [asdict(g) for g in groups],
                      "fraction": fraction}, sort_keys=True, default=str)
    return hashlib.sha256(key.encode()).hexdigest()[:24]


def cache_folder() -> Path:
    """Where measurements are kept between runs (``$XDG_CACHE_HOME/model-opt/sensitivity``)."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "model-opt" / "sensitivity"


def measure(model: Any, technique: Technique, options: dict[str, Any], groups: Sequence[Group],
            evaluate: Callable[[Any], float], baseline: float, higher_is_better: bool, context: Any,
            progress: Callable[[str], None], manager: Any = None) -> list[Sensitivity]:
    """Each group's drop of the metric when ``technique`` changes only that group (every other layer excluded),
    most costly first; progress with the time left after each group."""
    from .steps import apply_step

    everything = [n for g in groups for n in g.layers]
    sign = 1.0 if higher_is_better else -1.0
    results, started = [], time.perf_counter()
    for index, group in enumerate(groups):
        keep = sorted({*options.get("exclude", []), *(n for n in everything if n not in group.layers)})
        try:
            changed, record = apply_step(copy.deepcopy(model), technique, {**options, "exclude": keep}, context,
                                         manager)
        except TechniqueError as exc:  # a group the technique has nothing to do in (convolutions, for a Linear one)
            progress(f"[{index + 1}/{len(groups)}] {group.name}: not changed ({exc.problem}) "
                     f"({_left(started, index, len(groups))})")
            continue
        if record.info.get("changed") is False:
            continue
        metric = evaluate(changed.eval())
        results.append(Sensitivity(group.name, list(group.layers), metric, sign * (baseline - metric)))
        progress(f"[{index + 1}/{len(groups)}] {group.name}: drop {results[-1].drop:+.4f} "
                 f"({_left(started, index, len(groups))})")
    if not results:
        raise UsageError(f"{technique.label} changes none of the model's layer groups on its own",
                         "choose another technique or setting (see model-opt techniques)")
    return sorted(results, key=lambda r: -r.drop)


def _left(started: float, index: int, count: int) -> str:
    return f"~{(time.perf_counter() - started) / (index + 1) * (count - index - 1):.0f}s left"


def cached(key: str, compute: Callable[[], list[Sensitivity]], progress: Callable[[str], None]
           ) -> list[Sensitivity]:
    """``compute()``, or the measurement kept under ``key`` by an earlier run."""
    path = cache_folder() / f"{key}.json"
    try:
        rows = json.loads(path.read_text())
        found = [Sensitivity(**row) for row in rows]
        progress(f"sensitivity from an earlier run of the same model, technique and options ({path})")
        return found
    except (OSError, ValueError, TypeError):
        pass
    found = compute()
    try:
        from .atomic import write_text_atomic

        write_text_atomic(path, json.dumps([asdict(r) for r in found]))
    except OSError:  # a read-only home: measured again next time
        pass
    return found


def keep_sensitive_float(ranked: Sequence[Sensitivity], attempt: Callable[[list[str]], tuple[float, Any]],
                         budget: float, progress: Callable[[str], None], report: Any = None
                         ) -> tuple[list[Sensitivity], float, Any]:
    """Keep the most sensitive groups unchanged, one more at a time in the measured order, until ``attempt``
    (the technique applied with those layers excluded: its drop and its result) is within ``budget``; returns the
    groups kept, the drop and the result; raises :class:`AccuracyBudgetExceeded` (with ``report``) naming the best
    found when none is."""
    best: tuple[float, list[Sensitivity], Any] | None = None
    for count in range(1, len(ranked)):  # (keeping every group unchanged would change nothing)
        kept = list(ranked[:count])
        drop, result = attempt([n for r in kept for n in r.layers])
        progress(f"with {', '.join(r.group for r in kept)} unchanged: drop {drop:+.4f} (budget {budget:g})")
        if best is None or drop < best[0]:
            best = (drop, kept, result)
        if drop <= budget + 1e-12:
            return kept, drop, result
    detail = f"; the best found keeps {len(best[1])} groups unchanged for a drop of {best[0]:.4f}" if best else ""
    raise AccuracyBudgetExceeded(f"no mix of changed and unchanged layer groups stays within --max-accuracy-drop "
                                 f"{budget:g}{detail}; nothing was written", "allow a larger drop, or a milder "
                                 "setting of the technique", report=report)


def chart(ranked: Sequence[Sensitivity], path: Path, budget: float | None, title: str) -> Path:
    """A bar chart of the drops, most costly first, names readable, the budget drawn; written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .atomic import atomic_path

    shown = list(ranked)
    figure, axes = plt.subplots(figsize=(8, max(2.5, 0.32 * len(shown) + 1.2)))
    names = [r.group if len(r.group) <= 40 else "..." + r.group[-37:] for r in shown]
    axes.barh(range(len(shown)), [r.drop for r in shown], color="tab:red", alpha=0.7)
    axes.set_yticks(range(len(shown)), names, fontsize=8)
    axes.invert_yaxis()
    if budget is not None:
        axes.axvline(budget, color="k", ls=":", lw=1, label=f"budget ({budget:g})")
        axes.legend(loc="lower right", fontsize=8)
    axes.set_xlabel("metric drop with only this group changed (metric units)")
    axes.set_title(title, fontsize=9)
    figure.tight_layout()
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png", dpi=100)
    plt.close(figure)
    return path


def render(ranked: Sequence[Sensitivity], baseline: float, metric: str) -> str:
    """The table: group, layers, drop, share of the total drop."""
    total = sum(max(r.drop, 0.0) for r in ranked) or 1.0
    lines = [f"sensitivity of {metric} (original {baseline:.4f}), one group changed at a time, most costly first:",
             f"  {'group':<40} {'layers':>6} {'drop':>10} {'share':>6}"]
    for r in ranked:
        lines.append(f"  {r.group[:40]:<40} {len(r.layers):>6} {r.drop:>+10.4f} {max(r.drop, 0.0) / total:>6.0%}")
    return "\n".join(lines)


@dataclass
class SensitivityResult:
    """A measurement of ``model-opt sensitivity``: what was applied, to which model, the original's metric, and
    the groups ranked by the drop each causes alone."""

    model: str
    technique: str
    options: dict[str, Any]
    metric: str
    higher_is_better: bool
    baseline: float
    ranked: list[Sensitivity]
    budget: float | None = None
    eval_fraction: float | None = None
    output: str | None = None
    chart: str | None = None

    def to_dict(self) -> dict[str, Any]:
        from .device import device_profile
        from .outputs import SENSITIVITY_FORMAT

        total = sum(max(r.drop, 0.0) for r in self.ranked) or 1.0
        return {"format": SENSITIVITY_FORMAT, "model": self.model, "technique": self.technique,
                "options": self.options, "metric": self.metric, "higher_is_better": self.higher_is_better,
                "baseline": self.baseline, "max_accuracy_drop": self.budget, "eval_fraction": self.eval_fraction,
                "groups": [{**asdict(r), "share": max(r.drop, 0.0) / total} for r in self.ranked],
                "files": [Path(p).name for p in (self.output, self.chart) if p],
                "device_profile": device_profile().to_dict()}

    def render(self) -> str:
        lines = [render(self.ranked, self.baseline, self.metric),
                 f"technique: {self.technique} ({', '.join(f'{k}={v}' for k, v in self.options.items())})"]
        if self.eval_fraction is not None:
            lines.append(f"evaluated on {self.eval_fraction:.0%} of the data (--eval-fraction)")
        lines += [f"saved: {p}" for p in (self.output, self.chart) if p]
        return "\n".join(lines)


def sensitivity(model_path: str | os.PathLike[str], *, test_script: str | os.PathLike[str] | None,
                dataset: str | os.PathLike[str], step: Any, output: str | None = None,
                max_accuracy_drop: float | None = None, eval_fraction: float | None = None, refine: int = 0,
                progress: Callable[[str], None] | None = None, manager: Any = None, **settings: Any
                ) -> SensitivityResult:
    """``model-opt sensitivity``: ``step`` (one technique with an ``exclude`` option) applied to one group of
    layers at a time, each scored with the test script's metric (on ``eval_fraction`` of the data when the script
    takes ``fraction``), ranked; the ``refine`` most costly groups measured again layer by layer. Writes the JSON
    and the chart together; nothing on failure."""
    from .atomic import write_text_atomic
    from .job import Job, Settings
    from .outputs import output_lock
    from .report import dumps
    from .steps import check, plan

    if eval_fraction is not None and not (0 < eval_fraction <= 1):
        raise UsageError(f"--eval-fraction is {eval_fraction}", "pass a share of the data above 0 and up to 1")
    if refine < 0:
        raise UsageError(f"--refine is {refine}", "pass how many of the most costly groups to split into layers")
    job = Job.prepare(model_path, test_script=test_script, dataset=dataset, progress=progress, manager=manager,
                      settings=Settings.of({**settings, "output": output, "max_accuracy_drop": max_accuracy_drop,
                                            "writes": "sensitivity"}, "sensitivity"))
    (technique, options), = plan([step], job.manager)
    check_technique(technique)
    original = job.load()
    context = job.context()
    check(original, [(technique, options)], context)
    job.script.fraction = eval_fraction
    job.progress("measuring the original model")
    metrics = job.script.evaluate(original, job.dataset, job.device)
    groups = layer_groups(original)
    job.progress(f"{len(groups)} layer groups, one {technique.label} and one evaluation each")

    def run(chosen: Sequence[Group]) -> list[Sensitivity]:
        return cached(cache_key(job.model_path, technique, options, chosen, eval_fraction or 1.0),
                      lambda: measure(original, technique, options, chosen, lambda m: job.script.evaluate(
                          m, job.dataset, job.device).value, metrics.value, job.script.higher_is_better, context,
                          job.progress, job.manager), job.progress)

    ranked = run(groups)
    for worst in [r for r in ranked if len(r.layers) > 1][:refine]:
        job.progress(f"refining {worst.group}: its {len(worst.layers)} layers one at a time")
        ranked = sorted([r for r in ranked if r is not worst] + run([Group(n, [n]) for n in worst.layers]),
                        key=lambda r: -r.drop)
    result = SensitivityResult(str(job.model_path), technique.name, options, metrics.primary,
                               job.script.higher_is_better, metrics.value, ranked, max_accuracy_drop, eval_fraction,
                               str(job.output), str(job.output.with_suffix(".png")))
    with output_lock(job.output):
        chart(ranked, job.output.with_suffix(".png"), max_accuracy_drop,
              f"{technique.label} on {job.model_path.name}: {metrics.primary} drop, one group changed at a time")
        write_text_atomic(job.output, dumps(result.to_dict()))
    return result


#: How many of the most sensitive groups a report lists.
LISTED = 5


def ranking(job: Any, original: Any, technique: Technique, options: dict[str, Any], context: Any, baseline: float,
            progress: Callable[[str], None]) -> list[Sensitivity]:
    """The layer groups of ``job``'s model ranked by the drop ``technique`` causes in each alone, on the whole
    data (measured once for the model, technique and options: kept in the cache)."""
    def evaluate(model: Any) -> float:
        return job.script.evaluate(model, job.dataset, job.device).value

    groups = layer_groups(original)
    return cached(cache_key(job.model_path, technique, options, groups, 1.0),
                  lambda: measure(original, technique, options, groups, evaluate, baseline,
                                  job.script.higher_is_better, context, progress, job.manager), progress)


def mix_for_budget(job: Any, original: Any, planned: list, context: Any, report: Any) -> tuple[Any, list] | None:
    """``optimize --max-accuracy-drop`` for any technique with an ``exclude`` option, applied alone: when the drop
    is over half the budget, each group's own drop is measured (the report lists the most costly); when it is
    over the budget, the most sensitive groups are kept unchanged, in that order, until the metric is within it,
    then as few of the layers inside those groups as still keep it there (each layer's own drop measured).
    Returns the new model and its step records (the excluded layers recorded as the step's ``exclude``, so the
    artifact replays it), or None when nothing changes."""
    from .steps import apply_step

    budget, drop = job.max_accuracy_drop, report.metric_drop
    if budget is None or drop is None or drop <= budget / 2:
        return None
    if len(planned) != 1 or not any(o.name == "exclude" for o in planned[0][0].options):
        if drop > budget:
            report.warnings.append("layers are kept unchanged for the budget only for one technique with an "
                                   "exclude option run alone; run the techniques one at a time to use it")
        return None
    (technique, options), = planned
    baseline, sign = report.before.metric, 1.0 if job.script.higher_is_better else -1.0

    def evaluate(model: Any) -> float:
        return job.script.evaluate(model, job.dataset, job.device).value

    job.progress(f"the drop ({drop:.4f}) is over half the budget: measuring which layer groups cost it")
    ranked = ranking(job, original, technique, options, context, baseline, job.progress)
    report.sensitive = [asdict(r) for r in ranked[:LISTED]]
    if drop <= budget:
        return None

    def attempt(excluded: list[str]) -> tuple[float, Any]:
        keep = sorted({*options.get("exclude", []), *excluded})
        model, record = apply_step(copy.deepcopy(original), technique, {**options, "exclude": keep}, context,
                                   job.manager)
        return sign * (baseline - evaluate(model.eval())), (model.eval(), [record])

    kept, _, result = keep_sensitive_float(ranked, attempt, budget, job.progress, report)
    if any(len(r.layers) > 1 for r in kept):  # then the layers inside them: fewer may do
        inside = [Group(n, [n]) for r in kept for n in r.layers]
        layers = cached(cache_key(job.model_path, technique, options, inside, 1.0),
                        lambda: measure(original, technique, options, inside, evaluate, baseline,
                                        job.script.higher_is_better, context, job.progress, job.manager),
                        job.progress)
        fewer = fewest_kept(layers, attempt, budget, job.progress)
        if fewer is not None:
            kept, result = fewer
    report.kept_unchanged = [asdict(r) for r in kept]
    return result


def fewest_kept(layers: Sequence[Sensitivity], attempt: Callable[[list[str]], tuple[float, Any]], budget: float,
                progress: Callable[[str], None]) -> tuple[list[Sensitivity], Any] | None:
    """The fewest of ``layers`` (most sensitive first; keeping them all is known to meet ``budget``) that, kept
    unchanged in that order, still meet it: a bisection over how many, each count measured by ``attempt``. None
    when no fewer do."""
    found, low, high = None, 1, len(layers)
    while low < high:
        count = (low + high) // 2
        drop, result = attempt([n for r in layers[:count] for n in r.layers])
        progress(f"with {count} of the {len(layers)} layers unchanged: drop {drop:+.4f} (budget {budget:g})")
        if drop <= budget + 1e-12:
            found, high = (list(layers[:count]), result), count
        else:
            low = count + 1
    return found
