"""Plain-words warnings when the techniques did not make the model faster on this device: slow here, fast only
compiled, no latency change, an unsteady measurement, or a speed-up that is the runtime's and not the
technique's."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from .report import UNSTABLE_SPREAD, Report

#: Below this, a technique's own part of a speed-up is not a gain of its own (the runtime's is).
TECHNIQUE_GAIN = 1.05
#: ``model-opt export`` formats of the runtimes whose name is not their format's.
EXPORT_FORMATS = {"llama.cpp": "gguf"}


def speed_warnings(report: Report, planned: Sequence[tuple[Any, dict[str, Any]]], family: str | None = None
                   ) -> list[str]:
    """Plain-words warnings when the techniques did not make the model faster on this device (for a model of
    ``family``: some techniques are slow here for some families only)."""
    device = report.device.split(":")[0]
    warnings = [f"{s.backend} {s.method} changed nothing: {s.info.get('note', '')}" for s in report.steps
                if s.info.get("changed") is False]
    warnings += [f"{s.backend} {s.method}: {s.info['warning']}" for s in report.steps if s.info.get("warning")]
    compiled = report.after is not None and report.after.latency is not None and \
        report.after.latency.runtime == "compiled"
    for technique, options in planned:
        slow = technique.slow_here(report.device, family)
        speeds_up = technique.speeds_up_on(options)
        if slow:
            warnings.append(f"{technique.backend} {technique.method} is {slow}; model-opt recommend lists what is "
                            f"fast on this {'GPU' if device == 'cuda' else 'CPU'}")
        elif technique.fast_only_compiled(device, options) and not compiled:
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
    parts = report.headline_parts()
    if parts is not None and not report.no_technique and parts[1] < TECHNIQUE_GAIN and parts[0] > 1:
        runtime_part, technique, runtime = parts
        from .export_report import MEASURED_FORMATS

        fmt = EXPORT_FORMATS.get(runtime, runtime)
        how = ("compile the float model (torch.compile with inductor freezing)" if runtime == "compiled" else
               f"convert the float model to {runtime} (model-opt export MODEL --format {fmt}"
               f"{' --report' if fmt in MEASURED_FORMATS else ''})")
        warnings.append(f"the speed-up is the runtime's, not the technique's: float {runtime} runs "
                        f"{runtime_part:.2f}x the original, and the technique adds {technique:.2f}x; "
                        f"{how} for the same gain without it")
    speedup = report.speedup if report.stable else None
    if speedup is not None:
        if speedup < 0.95:
            warnings.append(f"the optimized model is slower than the original on {device} ({speedup:.2f}x)")
        elif speedup < 1.05:
            warnings.append(f"the optimized model is not measurably faster on {device} ({speedup:.2f}x)")
    return warnings
