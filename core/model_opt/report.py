"""The before/after report: a printed table and <output>.report.json."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

from .device import DeviceProfile
from .measure import Latency


@dataclass
class Measurement:
    metrics: dict[str, float]
    primary: str
    parameters: int
    nonzero_parameters: int
    size_bytes: int
    latency: Latency | None = None
    flops: int | None = None
    peak_memory_bytes: int | None = None  # its own process, opened and run as deployed (model_opt.memory)

    @property
    def metric(self) -> float:
        return self.metrics[self.primary]

    def to_dict(self) -> dict[str, Any]:
        return {
            "metrics": self.metrics,
            "primary_metric": self.primary,
            "parameters": self.parameters,
            "nonzero_parameters": self.nonzero_parameters,
            "size_bytes": self.size_bytes,
            "latency": self.latency.to_dict() if self.latency else None,
            "flops": self.flops,
            "peak_memory_bytes": self.peak_memory_bytes,
        }


@dataclass
class StepRecord:
    kind: str
    backend: str
    method: str
    plugin: str
    options: dict[str, Any]
    info: dict[str, Any]
    seconds: float
    #: The JSON state the plugin's ``restore`` hook replays, and whether that plugin has the hook.
    state: dict[str, Any] = field(default_factory=dict)
    replayable: bool = False
    standalone: bool = False

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class Report:
    model: str
    device: str
    threads: int
    higher_is_better: bool
    before: Measurement
    after: Measurement | None = None
    steps: list[StepRecord] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    output: str | None = None
    max_accuracy_drop: float | None = None
    latency_note: str = ""
    recovery: dict[str, Any] | None = None
    exported: str | None = None
    compile_seconds: float | None = None
    native_files: list[str] = field(default_factory=list)
    #: The float model in the result's runtime (the original compiled, for a compiled result; an OpenVINO result's
    #: float IR), timed in the same rounds as before and after: what the runtime gives without the technique.
    runtime_latency: Latency | None = None
    #: What each model ran in its own process when its peak memory was measured.
    memory_workload: str = ""
    #: How a causal LM's decode tokens/s were timed, when not in the evaluation's process.
    decode_workload: str = ""
    #: A causal LM's float model in the result's runtime, decoding in the same rounds as before and after: (the
    #: runtime, tokens/s).
    runtime_decode: tuple[str, float] | None = None
    #: The settings of the built-in evaluation (a causal LM's window, windows, prompt and generated lengths).
    evaluation: dict[str, Any] | None = None
    #: The machine the figures come from (CPU model, instruction sets, cores, memory, GPUs).
    profile: DeviceProfile | None = None
    #: The most costly layer groups (each one's drop alone), when the drop was over half the budget.
    sensitive: list[dict[str, Any]] = field(default_factory=list)
    #: The layer groups (or, when fewer layers inside them do, the layers) kept unchanged to meet the budget, most
    #: sensitive first (``--max-accuracy-drop``).
    kept_unchanged: list[dict[str, Any]] = field(default_factory=list)
    #: The result is the float model in another runtime, no technique applied (``model-opt export --report``): all
    #: of the speed-up is the runtime's.
    no_technique: bool = False

    @property
    def metric_drop(self) -> float | None:
        """How much the primary metric got worse (positive = worse), in the metric's own units."""
        if self.after is None:
            return None
        change = self.after.metric - self.before.metric
        return -change if self.higher_is_better else change

    @property
    def speedup(self) -> float | None:
        if self.after is None or not self.before.latency or not self.after.latency:
            return None
        return self.before.latency.median_ms / self.after.latency.median_ms

    @property
    def stable(self) -> bool:
        """Whether the timings were steady enough for a headline ratio."""
        timed = [t for t in (self.before.latency, self.after.latency if self.after else None, self.runtime_latency)
                 if t is not None]
        return not (timed and max(t.spread for t in timed) > UNSTABLE_SPREAD)

    @property
    def speedup_runtime(self) -> float | None:
        """The runtime's part of the speed-up: the float model in the result's runtime over the original as run
        today (steady timings only)."""
        if not (self.runtime_latency and self.before.latency and self.stable):
            return None
        return self.before.latency.median_ms / self.runtime_latency.median_ms

    @property
    def speedup_technique(self) -> float | None:
        """The technique's part: the result over the float model in the same runtime (steady timings only)."""
        after = self.after.latency if self.after else None
        if not (self.runtime_latency and after and self.stable):
            return None
        return self.runtime_latency.median_ms / after.median_ms

    @property
    def decode(self) -> tuple[str, float, float] | None:
        """A causal LM's decode tokens/s before and after (the built-in evaluation's figure, compiled when the run
        was), as ``(metric name, before, after)``; None for other models."""
        after = self.after.metrics if self.after else {}
        name = next((n for n in (DECODE, f"{DECODE}_compiled") if n in self.before.metrics and n in after), None)
        return (name, self.before.metrics[name], after[name]) if name and self.before.metrics[name] else None

    @property
    def decode_parts(self) -> tuple[float, float] | None:
        """A causal LM's decode speed-up split: (the runtime's part: its float model over the original as run
        today; the technique's: the result over that float model), when the float model in the result's runtime
        was timed."""
        if self.decode is None or not self.runtime_decode or not self.runtime_decode[1]:
            return None
        _, before, after = self.decode
        return self.runtime_decode[1] / before, after / self.runtime_decode[1]

    def headline_parts(self) -> tuple[float, float, str] | None:
        """The headline's split (the runtime's part, the technique's part, the runtime): the decode rate's for a
        causal LM, else the latency's."""
        if self.decode is not None:
            parts = self.decode_parts
            return (*parts, self.runtime_decode[0]) if parts and self.runtime_decode else None
        if self.speedup_runtime is None or self.speedup_technique is None or self.runtime_latency is None:
            return None
        return self.speedup_runtime, self.speedup_technique, self.runtime_latency.runtime

    @property
    def headline(self) -> float | None:
        """The one speed-up a person reads first: a causal LM's decode tokens/s ratio; else the latency ratio over
        the original as run today (None when unsteady)."""
        if self.decode is not None:
            _, before, after = self.decode
            return after / before
        return self.speedup if self.stable else None

    @property
    def speedup_range(self) -> tuple[float, float] | None:
        """Lowest and highest speed-up of the interleaved rounds (each round's before over its after)."""
        return speedup_range(self.before.latency, self.after.latency if self.after else None)

    @property
    def within_budget(self) -> bool:
        drop = self.metric_drop
        return self.max_accuracy_drop is None or drop is None or drop <= self.max_accuracy_drop + 1e-12

    def summary(self) -> dict[str, Any]:
        """The few numbers a person reads first: what ran, the metric before and after, speed, size."""
        after = self.after
        return {
            "techniques": [f"{s.kind} {s.backend}:{s.method}" for s in self.steps],
            "metric": self.before.primary,
            "metric_before": self.before.metric,
            "metric_after": after.metric if after else None,
            "metric_drop": self.metric_drop,
            "within_budget": self.within_budget,
            "speedup": self.headline,
            **({"decode_speedup": self.headline, "prefill_speedup": self.speedup if self.stable else None,
                "prefill_speedup_runtime": self.speedup_runtime, "prefill_speedup_technique": self.speedup_technique}
               if self.decode else {}),
            "speedup_range": self.speedup_range,
            "speedup_runtime": parts[0] if (parts := self.headline_parts()) else None,
            "speedup_technique": parts[1] if parts else None,
            "size_ratio": after.size_bytes / self.before.size_bytes if after and self.before.size_bytes else None,
            **({"peak_memory_ratio": after.peak_memory_bytes / self.before.peak_memory_bytes}
               if after and after.peak_memory_bytes and self.before.peak_memory_bytes else {}),
            "output": self.output,
            "warnings": len(self.warnings),
        }

    def to_dict(self) -> dict[str, Any]:
        """The summary first; each step's replay state (long: layer shapes) under ``details`` at the end."""
        return {
            "summary": self.summary(),
            "model": self.model,
            "output": self.output,
            "device": self.device,
            "threads": self.threads,
            "higher_is_better": self.higher_is_better,
            "steps": [{k: v for k, v in s.to_dict().items() if k != "state"} for s in self.steps],
            "before": self.before.to_dict(),
            "after": self.after.to_dict() if self.after else None,
            "metric_drop": self.metric_drop,
            "speedup": self.speedup,
            "speedup_range": self.speedup_range,
            "latency_stable": self.stable,
            "max_accuracy_drop": self.max_accuracy_drop,
            "within_budget": self.within_budget,
            "warnings": self.warnings,
            "latency_note": self.latency_note,
            "recovery": self.recovery,
            "exported": self.exported,
            "compile_seconds": self.compile_seconds,
            "native_files": self.native_files,
            "runtime_latency": self.runtime_latency.to_dict() if self.runtime_latency else None,
            "memory_workload": self.memory_workload or None,
            "decode_workload": self.decode_workload or None,
            "runtime_decode": {"runtime": self.runtime_decode[0], "tokens_per_s": self.runtime_decode[1]}
            if self.runtime_decode else None,
            "evaluation": self.evaluation,
            "device_profile": self.profile.to_dict() if self.profile else None,
            "sensitive_groups": self.sensitive,
            "kept_unchanged": self.kept_unchanged,
            "no_technique": self.no_technique,
            "details": {"replay_state": [s.state for s in self.steps]},
        }

    def headline_text(self) -> str | None:
        """The headline in words: how much faster than the original as run today, and where it came from."""
        if self.decode is not None:
            name, before, after = self.decode
            prefill = f"; prefill {speed_text(self.speedup)}" if self.speedup and self.stable else ""
            how = f"; {self.decode_workload}" if self.decode_workload else ""
            return (f"decode {speed_text(after / before)} ({before:.1f} -> {after:.1f} tokens/s, {name}{how})"
                    f"{_parts(self.headline_parts())}{prefill}")
        if self.headline is None:
            return None
        return (f"{speed_text(self.headline)} than the original as run today ({self.before.latency.runtime})"
                f"{_parts(self.headline_parts(), not self.no_technique)}")

    def to_json(self) -> str:
        return dumps(self.to_dict())

    def render(self) -> str:
        """A plain-text table, before and after."""
        b, a = self.before, self.after
        rows: list[tuple[str, str, str, str]] = []
        names = list(b.metrics) + [n for n in (a.metrics if a else {}) if n not in b.metrics]
        for name in names:
            before = b.metrics.get(name)
            after = a.metrics.get(name) if a else None
            label = f"{name}{' (primary)' if name == b.primary else ''}"
            rows.append((label, _num(before), _num(after), _delta(before, after)))
            if self.decode and name == self.decode[0] and self.decode_parts and self.runtime_decode:
                runtime, rate = self.runtime_decode
                rows.append((f"  of which the runtime (-> float {runtime})", _num(before), _num(rate),
                             speed_text(self.decode_parts[0])))
                rows.append((f"  of which the technique ({runtime} both)", _num(rate), _num(after),
                             speed_text(self.decode_parts[1])))
            if self.recovery and name in self.recovery["metrics_before_recovery"]:
                pre = self.recovery["metrics_before_recovery"][name]
                rows.append((f"  before {self.recovery['steps']}-step recovery", _num(before), _num(pre),
                             _delta(before, pre)))
        if b.latency:
            la = a.latency if a else None
            rows.append((f"latency median ms ({b.latency.runtime}"
                         f"{'' if not la or la.runtime == b.latency.runtime else ' -> ' + la.runtime})",
                         f"{b.latency.median_ms:.3f}", f"{la.median_ms:.3f}" if la else "-",
                         speed_text(self.speedup) if self.stable else _unstable(self.speedup_range)))
            rows.append(("latency p90 ms", f"{b.latency.p90_ms:.3f}", f"{la.p90_ms:.3f}" if la else "-",
                         speed_text(b.latency.p90_ms / la.p90_ms if la and la.p90_ms else None) if self.stable
                         else "-"))
            rt = self.runtime_latency
            if rt is not None and la is not None and not self.no_technique:  # (else the runtime's is all of it)
                rows.append((f"  of which the runtime ({b.latency.runtime} -> float {rt.runtime})",
                             f"{b.latency.median_ms:.3f}", f"{rt.median_ms:.3f}",
                             speed_text(self.speedup_runtime) if self.stable else _unstable(
                                 speedup_range(b.latency, rt))))
                rows.append((f"  of which the technique ({rt.runtime} both)", f"{rt.median_ms:.3f}",
                             f"{la.median_ms:.3f}", speed_text(self.speedup_technique) if self.stable else
                             _unstable(speedup_range(rt, la))))
        else:
            rows.append(("latency", "n/a", "n/a", self.latency_note or "no example input"))
        rows.append(("parameters", f"{b.parameters:,}", f"{a.parameters:,}" if a else "-",
                     _ratio(a.parameters if a else None, b.parameters, "x of before")))
        if a and a.nonzero_parameters != a.parameters:
            rows.append(("non-zero parameters", f"{b.nonzero_parameters:,}", f"{a.nonzero_parameters:,}",
                         _ratio(a.nonzero_parameters, b.nonzero_parameters, "x of before")))
        rows.append(("size on disk", _bytes(b.size_bytes), _bytes(a.size_bytes) if a else "-",
                     _ratio(a.size_bytes if a else None, b.size_bytes, "x of before")))
        if b.flops is not None or (a and a.flops is not None):
            rows.append(("FLOPs", _big(b.flops), _big(a.flops if a else None),
                         _ratio(a.flops if a else None, b.flops, "x of before")))
        if b.peak_memory_bytes is not None and a and a.peak_memory_bytes is not None:
            rows.append((f"peak memory ({self.memory_workload})", _bytes(b.peak_memory_bytes),
                         _bytes(a.peak_memory_bytes), _ratio(a.peak_memory_bytes, b.peak_memory_bytes, "x of before")))
        if b.latency and b.latency.interleaved:
            spread = max(b.latency.spread, a.latency.spread if a and a.latency else 0.0)
            rows.append(("latency spread (p90-p10)/median", f"{b.latency.spread:.0%}",
                         f"{a.latency.spread:.0%}" if a and a.latency else "-",
                         "unstable" if spread > UNSTABLE_SPREAD else "stable"))
        widths = [max(len(r[i]) for r in [("", "before", "after", "change"), *rows]) for i in range(4)]
        line = "  ".join("-" * w for w in widths)
        out = [f"model-opt report: {self.model} on {self.device} ({self.threads} threads)"]
        if self.profile:
            out.append(f"  device: {self.profile.describe(self.device)}")
        if self.evaluation:
            out.append("  evaluation: built-in, " + ", ".join(f"{k} {v}" for k, v in self.evaluation.items())
                       + " (tokens; MODEL_OPT_LM_*)")
        for step in self.steps:
            opts = ", ".join(f"{k}={v}" for k, v in step.options.items())
            out.append(f"  step: {step.kind} {step.backend}:{step.method} ({opts}) in {step.seconds:.1f}s")
        if self.no_technique and self.after is not None and self.after.latency is not None:
            out.append(f"  no technique: the float model in {self.after.latency.runtime}")
        headline = self.headline_text()
        if headline:
            out.append(f"  headline: {headline}")
        out.append(line)
        for row in [("", "before", "after", "change"), *rows]:
            out.append("  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w)
                                 in enumerate(zip(row, widths, strict=False))))
        out.append(line)
        if self.compile_seconds is not None:
            out.append(f"latency after: torch.compile with freezing (one-time compile cost "
                       f"{self.compile_seconds:.1f}s); before: eager; metrics: eager")
        if self.kept_unchanged:
            out.append("kept unchanged to meet --max-accuracy-drop (most sensitive first): " + ", ".join(
                f"{g['group']} (" + (f"{len(g['layers'])} layers, " if len(g['layers']) > 1 else "") +
                f"drop alone {g['drop']:+.4f})" for g in self.kept_unchanged))
        for group in self.sensitive:
            out.append(f"sensitive: {group['group']} costs {group['drop']:+.4f} of {self.before.primary} changed "
                       f"alone ({len(group['layers'])} layers)")
        for warning in self.warnings:
            out.append(f"warning: {warning}")
        if self.output:
            out.append(f"saved: {self.output}")
        for path in self.native_files:
            out.append(f"also saved: {path}")
        if self.exported:
            out.append(f"exported: {self.exported} (torch.export program; loads with no trust flag)")
        return "\n".join(out)


def _parts(parts: tuple[float, float, str] | None, technique: bool = True) -> str:
    """The headline's split in words (empty when it was not measured); with no ``technique``, all of it is the
    runtime's."""
    if parts is None:
        return ""
    if not technique:
        return f": all of it from the runtime (float {parts[2]}; no technique)"
    return f": {parts[0]:.2f}x from the runtime (float {parts[2]}), {parts[1]:.2f}x from the technique"


#: Above this spread of the timings, the report says the measurement was unstable.
UNSTABLE_SPREAD = 0.5
#: The built-in causal-LM evaluation's decode figure (tokens/s), the headline of a causal LM's report.
DECODE = "decode_tokens_per_s"


def finite(value: Any) -> Any:
    """``value`` with non-finite floats as strings ("inf", "nan"), so that the JSON is valid."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite(v) for v in value]
    return value


def dumps(value: Any) -> str:
    """Strict JSON (no bare NaN/Infinity) of a report mapping."""
    return json.dumps(finite(value), indent=2, default=str, allow_nan=False)


def speed_text(ratio: float | None) -> str:
    """'1.80x faster' or '10.0x slower' from before/after times (never '0.10x faster')."""
    if not ratio:
        return "-"
    return f"{ratio:.2f}x faster" if ratio >= 1 else f"{1 / ratio:.2f}x slower"


def speedup_range(b: Any, a: Any) -> tuple[float, float] | None:
    """Lowest and highest speed-up of interleaved rounds (each round's ``b`` latency over its ``a``)."""
    if not (b and a and b.rounds_ms and len(b.rounds_ms) == len(a.rounds_ms)):
        return None
    ratios = [x / y for x, y in zip(b.rounds_ms, a.rounds_ms, strict=True) if y]
    return (min(ratios), max(ratios)) if ratios else None


def _unstable(span: tuple[float, float] | None) -> str:
    """No headline for an unstable measurement: the range the rounds gave, or nothing."""
    if not span:
        return "unstable: no ratio"
    low, high = span
    return f"{low:.2f}-{high:.2f}x, unstable"


def _num(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def _delta(before: float | None, after: float | None) -> str:
    if before is None or after is None:
        return "-"
    return f"{after - before:+.4f}"


def _ratio(num: float | None, den: float | None, suffix: str) -> str:
    if not num or not den:
        return "-"
    return f"{num / den:.2f}{suffix}"


def _bytes(n: int | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _big(n: int | None) -> str:
    if n is None:
        return "not counted"
    for unit, scale in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f}{unit}"
    return str(n)
