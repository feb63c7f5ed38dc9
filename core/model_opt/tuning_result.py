"""The tuner's result: every trial as a row, the Pareto front within the budget, the best candidate (the top three
re-applied and re-measured against the original before choosing), saved with its report and a plot."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .atomic import atomic_path, write_text_atomic
from .compare import time_against_original
from .context import TechniqueContext
from .device import DeviceProfile, device_profile
from .errors import AccuracyBudgetExceeded, ModelOptError
from .job import Job
from .outputs import output_lock, report_path, side_path
from .redaction import redact
from .report import dumps, speed_text
from .timing import Deployed, runtime_of
from .tuning_trials import Baseline, build_candidate, decode_rate


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
    device: str = "cpu"
    profile: DeviceProfile = field(default_factory=device_profile)
    #: The float model in another runtime, no technique, timed against the original as the finalists were:
    #: runtime, speedup (or error), command.
    runtime_route: dict[str, Any] | None = None

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
                "plot": self.plot, "warnings": self.warnings, "device": self.device,
                "device_profile": self.profile.to_dict(), "runtime_route": self.runtime_route}

    def render(self) -> str:
        lines = [f"autotune study {self.study!r}: {len(self.trials)} trials, baseline metric "
                 f"{self.baseline.metric:.4f}, latency {self.baseline.latency_ms:.3f} ms",
                 f"device: {self.device} — {self.profile.describe(self.device)}"]
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
        route = self.runtime_route
        if route and route.get("speedup"):
            lines.append(f"no technique: the float model in {route['runtime']}, {speed_text(route['speedup'])} "
                         f"(re-measured against the original, alone), drop {route['drop']:.4g}: {route['command']}")
        elif route and route.get("error"):
            lines.append(f"no technique: the float model in {route['runtime']} was not timed: {route['error']}")
        for warning in self.warnings:
            lines.append(f"warning: {warning}")
        if self.output:
            lines.append(f"saved: {self.output}")
        if self.plot:
            lines.append(f"plot: {self.plot}")
        return "\n".join(lines)


def pareto_front(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
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
    result = TuneResult(study.study_name, storage, baseline, rows, pareto_front(feasible), None, objective=objective,
                        device=job.device)
    if objective == "latency":  # the route with no technique, measured as a candidate is
        result.runtime_route = runtime_route(job, baseline.metric)
    route = result.runtime_route or {}
    if not feasible:
        closest = min(measured, key=lambda r: r["drop"]) if measured else None
        detail = (f"; the closest was trial {closest['number']} ({closest['description']}) with a drop of "
                  f"{closest['drop']:.4f}" if closest else "")
        raise AccuracyBudgetExceeded(f"no candidate stayed within --max-accuracy-drop {budget:g} after "
                                     f"{len(rows)} trials{detail}; nothing was saved",
                                     "allow a larger drop, more trials, or other techniques"
                                     f"{_no_technique(job, route)}",
                                     report=result)
    key = {"size": lambda r: (r["size_ratio"], r["drop"]),
           "both": lambda r: (r["size_ratio"] / r["speedup"], r["drop"])}.get(objective, lambda r: (-r["speedup"],
                                                                                                  r["drop"]))
    # One trial's timing is noisy on a shared machine: re-apply the top candidates and time them against
    # the original in interleaved rounds before choosing.
    finalists = sorted(feasible, key=key)[:3]
    job.progress(f"re-measuring the top {len(finalists)} candidates against the original")
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
            timed = time_against_original(job, job.model, model, records, runnable if runnable is not model else None,
                                          progress=lambda message: None)
            row["remeasured_speedup"] = timed.before.median_ms / timed.after.median_ms
    if objective != "size":
        finalists.sort(key=lambda r: (-r["remeasured_speedup"] / (r["size_ratio"] if objective == "both" else 1),
                                      r["drop"]))
    result.best = finalists[0]
    if route.get("speedup") and route["drop"] <= budget + 1e-12 and \
            route["speedup"] > result.best["remeasured_speedup"]:
        result.warnings.append(f"the float model in {route['runtime']}, with no technique, ran "
                               f"{route['speedup']:.2f}x the original here, faster than the best candidate "
                               f"({result.best['remeasured_speedup']:.2f}x): {route['command']}")
    elif result.best["remeasured_speedup"] < 1.0 and objective != "size":
        result.warnings.append(f"no candidate within budget was faster than the original on {job.device}"
                               f"{_no_technique(job, route)}")
    save_best(job, result, built[result.best["number"]], measured)
    return result


def runtime_route(job: Job, baseline_metric: float) -> dict[str, Any] | None:
    """The route without a technique (:func:`model_opt.recommend.runtime_here`: the float model in OpenVINO on a
    CPU), evaluated with the test script and timed against the original as the finalists were, each alone: runtime,
    command, metric, drop, speedup; None where there is none, its error where it could not be measured."""
    from .export_report import staged_export, timed_against_original
    from .recommend import runtime_here

    runtime = runtime_here(job.family or "", job.device)
    if runtime is None or job.example is None:
        return None
    route: dict[str, Any] = {"runtime": runtime, "command": _command(job, runtime)}
    job.progress(f"timing the float model in {runtime} (no technique) against the original")
    try:
        with staged_export(job.model, job.example, runtime) as (_, staged, exported):
            metric = job.script.evaluate(exported, job.dataset, job.device).value
            before, after = timed_against_original(
                Deployed(str(job.model_path.resolve()), str(job.script.path), job.trust_model,
                         model_path=str(job.model_path.resolve()), run_compiled=job.compile),
                staged, runtime_of(exported), job.example, job.device)
    except ModelOptError as exc:
        return {**route, "error": exc.problem}
    drop = baseline_metric - metric if job.script.higher_is_better else metric - baseline_metric
    return {**route, "metric": metric, "drop": drop, "speedup": before.median_ms / after.median_ms}


def _no_technique(job: Job, route: dict[str, Any] | None = None) -> str:
    """The route without a technique, where there is one: the float model in another runtime (with its measured
    drop and speed-up, where :func:`runtime_route` measured it)."""
    from .recommend import runtime_here

    if route and route.get("speedup"):
        within = "stays within it" if route["drop"] <= (job.max_accuracy_drop or 0) + 1e-12 else "does not either"
        return (f"; or no technique: the float model in {route['runtime']} {within} (drop {route['drop']:.4g}) and "
                f"ran {route['speedup']:.2f}x the original here ({route['command']})")
    runtime = runtime_here(job.family or "", job.device)
    return f"; or no technique: the float model in {runtime} ({_command(job, runtime)})" if runtime else ""


def _command(job: Job, runtime: str) -> str:
    """The command that measures the float model in ``runtime`` for this job's model, data and test script."""
    from .recommend import runtime_command

    return runtime_command(job.model_path, runtime, job.dataset, f" --test-script {job.script.path}")


def save_best(job: Job, result: TuneResult, candidate: tuple[Any, list, Any], measured: list[dict[str, Any]]) -> None:
    """Write the best candidate, its Pareto plot and the report together."""
    best, out = result.best, job.output
    job.progress(f"saving the best candidate (trial {best['number']})")
    model, records, _ = candidate
    if best["runtime"] == "compiled":
        result.warnings.append("the best candidate was measured under torch.compile with inductor freezing: run it "
                               "that way (torch._inductor.config.freezing = True; torch.compile(model))")
    result.output = str(out)
    with output_lock(out):  # the side files first, so that the recipe lists them (all appear together)
        result.plot = plot(measured, result.pareto, best, side_path(out, ".pareto.png", job.folder_output),
                           job.max_accuracy_drop)
        report = write_text_atomic(report_path(out, job.folder_output), redact(dumps(result.to_dict())))
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
