"""Measure a model: latency (median and p90), parameters, size on disk, FLOPs."""

from __future__ import annotations

import io
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any


@dataclass
class Latency:
    median_ms: float
    p90_ms: float
    runs: int
    runtime: str = "eager"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def call_model(model: Any, example_input: Any) -> Any:
    """Call ``model`` with a tensor, a tuple/list of positional inputs, or a dict of keyword inputs."""
    if isinstance(example_input, dict):
        return model(**example_input)
    if isinstance(example_input, (tuple, list)):
        return model(*example_input)
    return model(example_input)


def to_device(value: Any, device: str) -> Any:
    import torch

    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, dict):
        return {k: to_device(v, device) for k, v in value.items()}
    if isinstance(value, (tuple, list)):
        return type(value)(to_device(v, device) for v in value)
    return value


def count_parameters(model: Any) -> tuple[int, int]:
    """(parameters, non-zero parameters), each tensor counted once.

    A module that runs outside torch (an OpenVINO model) may answer through ``parameter_count()``.
    """
    import torch

    custom = getattr(model, "parameter_count", None)
    if callable(custom):
        return custom()

    seen: set[int] = set()
    total = nonzero = 0
    tensors = list(model.parameters()) if isinstance(model, torch.nn.Module) else []
    for tensor in tensors:
        if id(tensor) in seen:
            continue
        seen.add(id(tensor))
        total += tensor.numel()
        try:
            nonzero += int(torch.count_nonzero(tensor.detach()).item())
        except (RuntimeError, NotImplementedError, TypeError):  # tensor subclasses without count_nonzero
            nonzero += tensor.numel()
    return total, nonzero


def state_dict_bytes(model: Any) -> int:
    """Bytes of ``torch.save(model.state_dict())``: the size the weights take on disk."""
    import torch

    buffer = io.BytesIO()
    try:
        torch.save(model.state_dict(), buffer)
    except Exception:
        return 0
    return buffer.tell()


def count_flops(model: Any, example_input: Any) -> int | None:
    """FLOPs of one forward pass by torch.utils.flop_counter, or None where it cannot count."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    if example_input is None:
        return None
    try:
        counter = FlopCounterMode(display=False)
        with torch.no_grad(), counter:
            call_model(model, example_input)
        return int(counter.get_total_flops())
    except Exception:
        return None


def measure_latency(fn: Callable[[], Any], warmup: int = 3, repeats: int = 30, budget_s: float = 3.0,
                    sync: Callable[[], None] | None = None, runtime: str = "eager") -> Latency:
    """Run ``fn`` ``warmup`` times, then up to ``repeats`` times (or ``budget_s`` seconds)."""
    for _ in range(warmup):
        fn()
    if sync:
        sync()
    times: list[float] = []
    started = time.perf_counter()
    while len(times) < repeats and (len(times) < 5 or time.perf_counter() - started < budget_s):
        t0 = time.perf_counter()
        fn()
        if sync:
            sync()
        times.append((time.perf_counter() - t0) * 1000)
    times.sort()
    p90 = times[min(len(times) - 1, int(round(0.9 * (len(times) - 1))))]
    return Latency(statistics.median(times), p90, len(times), runtime)


def compile_model(model: Any, example_input: Any) -> tuple[Any, float]:
    """torch.compile with inductor freezing (weights folded as constants); returns (compiled, seconds).

    The first calls, which compile, happen here so that the seconds are the one-time compile cost.
    """
    import torch
    import torch._inductor.config as inductor_config

    started = time.perf_counter()
    compiled = torch.compile(model)
    with inductor_config.patch(freezing=True), torch.inference_mode():
        call_model(compiled, example_input)
        call_model(compiled, example_input)
    return compiled, time.perf_counter() - started


def interleaved_ms(candidates: dict[str, Callable[[], Any]], rounds: int = 7, per_round: int = 3,
                   warmup: int = 2, sync: Callable[[], None] | None = None) -> dict[str, float]:
    """Median milliseconds per call of each candidate, timed in interleaved rounds so that drifts of a
    shared machine hit every candidate alike (used to compare candidates against each other)."""
    import torch

    samples: dict[str, list[float]] = {name: [] for name in candidates}
    with torch.inference_mode():
        for fn in candidates.values():
            for _ in range(warmup):
                fn()
        for _ in range(rounds):
            for name, fn in candidates.items():
                started = time.perf_counter()
                for _ in range(per_round):
                    fn()
                if sync:
                    sync()
                samples[name].append((time.perf_counter() - started) * 1000 / per_round)
    return {name: statistics.median(values) for name, values in samples.items()}


def model_latency(model: Any, example_input: Any, device: str, runtime: str = "eager") -> Latency:
    import torch

    sync = torch.cuda.synchronize if device.startswith("cuda") else None

    def run() -> None:
        with torch.inference_mode():
            call_model(model, example_input)

    return measure_latency(run, sync=sync, runtime=runtime)
