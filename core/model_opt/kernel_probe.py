"""What the CPU's flags cannot say: whether oneDNN's int8 matmul kernels outrun its float ones on this machine.

Two x86 CPUs with the same flags (AVX2, no VNNI) can differ several-fold here: a first-generation Zen ran oneDNN's
u8s8 linear slower than float, where a later AVX2 EPYC ran int8 graphs faster than float. So model-opt times it:
one int8 linear (uint8 activations, int8 weights, the kernel INC's compiled int8 graphs call) against the float
linear of the same shape, interleaved, at this process's threads. The ratio is measured once per machine, CPU and
torch version and kept under ``$XDG_CACHE_HOME/model-opt/device``; ``MODEL_OPT_INT8_SPEEDUP`` sets it instead (to
plan for another machine, or to skip the measurement). Nothing here imports torch: it is measured only in a
process that has imported torch already (recommend, optimize, autotune), never for ``model-opt --help``.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

#: Overrides the measurement: the int8 linear's speed-up over float on the deployment machine.
ENV = "MODEL_OPT_INT8_SPEEDUP"
#: (rows, in features, out features): an encoder's projection and its MLP, at a few hundred tokens.
SHAPES = ((448, 384, 1536), (256, 768, 3072))
ROUNDS = 12


@dataclass(frozen=True)
class Int8Speed:
    """oneDNN's int8 linear against its float linear on this machine: ``speedup`` = float time / int8 time."""

    speedup: float
    source: str  # "measured" (now or cached) or the environment variable that set it
    float_ms: float | None = None
    int8_ms: float | None = None

    def describe(self) -> str:
        how = "measured" if self.source == "measured" else f"set by {self.source}"
        return f"int8 linear {self.speedup:.2f}x float ({how})"


def cache_folder() -> Path:
    """Where the measurement is kept (``$XDG_CACHE_HOME/model-opt/device``)."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "model-opt" / "device"


def int8_speed(cpu: str, isa: tuple[str, ...]) -> Int8Speed | None:
    """The int8 linear's speed on this machine: from :data:`ENV`, else from the cache, else measured now when
    torch is imported already (and kept); None where it is unknown (torch not imported, not an x86 CPU, no oneDNN
    int8 kernels)."""
    override = os.environ.get(ENV)
    if override:
        try:
            value = float(override)
        except ValueError:
            value = 0.0
        if value <= 0:
            from .errors import UsageError

            raise UsageError(f"{ENV}={override!r} is not a speed-up", "set it to a positive number (the "
                             "deployment CPU's int8 linear speed over float; above 1: int8 is faster), or unset it "
                             "to measure this machine")
        return Int8Speed(value, ENV)
    torch = sys.modules.get("torch")
    version = getattr(torch, "__version__", None)
    threads = torch.get_num_threads() if torch is not None else os.cpu_count()
    key = json.dumps({"cpu": cpu, "isa": isa, "torch": version, "threads": threads}, sort_keys=True)
    path = cache_folder() / f"int8-{hashlib.sha256(key.encode()).hexdigest()[:16]}.json"
    try:
        return Int8Speed(**{**json.loads(path.read_text()), "source": "measured"})
    except (OSError, ValueError, TypeError):
        pass
    if torch is None or platform.machine().lower() not in ("x86_64", "amd64"):
        return None
    found = measure_int8_speed()
    if found is not None:
        try:
            from .atomic import write_text_atomic

            path.parent.mkdir(parents=True, exist_ok=True)
            write_text_atomic(path, json.dumps({k: v for k, v in asdict(found).items() if k != "source"}))
        except OSError:
            pass  # a read-only home: measured again next time
    return found


def measure_int8_speed(shapes: tuple[tuple[int, int, int], ...] = SHAPES, rounds: int = ROUNDS) -> Int8Speed | None:
    """Time oneDNN's u8s8 linear (``onednn.qlinear_pointwise``, float output) against the float linear of each
    shape, alternating calls; the ratio of the summed medians. None where the int8 kernel is not in this torch, or
    its outputs are not the float linear's (within the rounding of 7-bit activations)."""
    import torch

    float_total = int8_total = 0.0
    generator = torch.Generator().manual_seed(0)
    try:
        with torch.no_grad():
            for rows, inputs, outputs in shapes:
                x = torch.randn(rows, inputs, generator=generator)
                weight = torch.randn(outputs, inputs, generator=generator) / inputs ** 0.5
                bias = torch.zeros(outputs)
                x_scale = float(x.abs().max()) / 63  # 7-bit activations, as on CPUs without int8 dot products
                qx = torch.clamp(torch.round(x / x_scale) + 64, 0, 127).to(torch.uint8)
                w_scale = weight.abs().amax(1) / 127
                packed = torch.ops.onednn.qlinear_prepack(
                    torch.clamp(torch.round(weight / w_scale[:, None]), -127, 127).to(torch.int8), [rows, inputs])
                w_zero = torch.zeros(outputs, dtype=torch.int64)

                def int8(qx=qx, x_scale=x_scale, packed=packed, w_scale=w_scale, w_zero=w_zero, bias=bias):
                    return torch.ops.onednn.qlinear_pointwise(qx, x_scale, 64, packed, w_scale, w_zero, bias, 1.0, 0,
                                                              torch.float32, "none", [], "")

                def floating(x=x, weight=weight, bias=bias):
                    return torch.nn.functional.linear(x, weight, bias)

                expected = floating()
                if float((int8() - expected).abs().max()) > 0.1 * float(expected.abs().max()):
                    return None  # not the kernel this probe means to time: no figure rather than a wrong one
                times: dict[str, list[float]] = {"float": [], "int8": []}
                for index in range(rounds + 2):
                    for name, call in (("float", floating), ("int8", int8)):
                        started = time.perf_counter()
                        call()
                        if index >= 2:  # (two warm-up rounds)
                            times[name].append(time.perf_counter() - started)
                float_total += statistics.median(times["float"]) * 1e3
                int8_total += statistics.median(times["int8"]) * 1e3
    except (RuntimeError, AttributeError, NotImplementedError):
        return None  # no oneDNN int8 kernels in this build
    return Int8Speed(round(float_total / int8_total, 3), "measured", round(float_total, 3), round(int8_total, 3))
