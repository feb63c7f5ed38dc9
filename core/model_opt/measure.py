"""Measure a model: latency (median and p90), parameters, size on disk, FLOPs."""

from __future__ import annotations

import io
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class Latency:
    median_ms: float
    p90_ms: float
    runs: int
    runtime: str = "eager"
    #: (p90 - p10) / median of the samples: how much the timings moved.
    spread: float = 0.0
    #: Timed in the same interleaved rounds as the other side of a before/after comparison.
    interleaved: bool = False
    #: Median of each round's block (interleaved timings), for the range of a ratio.
    rounds_ms: list[float] = field(default_factory=list)

    @classmethod
    def of(cls, samples: list[float], runtime: str = "eager", rounds_ms: list[float] | None = None) -> Latency:
        """Median, p90 and spread of ``samples`` (milliseconds per call); ``rounds_ms``: the medians of the rounds
        of an interleaved timing (:func:`rotating_rounds`), which makes it interleaved."""
        times = sorted(samples)

        def pct(q: float) -> float:
            return times[min(len(times) - 1, int(round(q * (len(times) - 1))))]

        median = statistics.median(times)
        return cls(median, pct(0.9), len(times), runtime, (pct(0.9) - pct(0.1)) / median if median else 0.0,
                   rounds_ms is not None, list(rounds_ms or []))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Timings:
    """What the timer gives for one candidate: every call's milliseconds, and the median of each round."""

    samples: list[float] = field(default_factory=list)
    rounds_ms: list[float] = field(default_factory=list)

    def latency(self, runtime: str = "eager") -> Latency:
        return Latency.of(self.samples, runtime, self.rounds_ms)


def call_model(model: Any, example_input: Any) -> Any:
    """Call ``model`` with a tensor, a tuple/list of positional inputs, or a dict of keyword inputs."""
    if isinstance(example_input, dict):
        return model(**example_input)
    if isinstance(example_input, (tuple, list)):
        return model(*example_input)
    return model(example_input)


def split_input(example_input: Any) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """``(args, kwargs)`` of a model input in any of its three forms (tensor, tuple, dict)."""
    if isinstance(example_input, dict):
        return (), dict(example_input)
    if isinstance(example_input, (tuple, list)):
        return tuple(example_input), {}
    return (example_input,), {}


def export_program(model: Any, example_input: Any, dynamic_batch: bool = True, strict: bool | None = None) -> Any:
    """``torch.export.export`` of ``model`` on an input of any form, with a dynamic batch dimension where the
    model allows it (else the example's static shapes)."""
    import torch

    args, kwargs = split_input(example_input)
    extra = {} if strict is None else {"strict": strict}
    if dynamic_batch:
        batch = torch.export.Dim("batch", min=1)

        def dim(value: Any) -> Any:
            return {0: batch} if isinstance(value, torch.Tensor) and value.dim() else None

        dynamic: Any = {k: dim(v) for k, v in kwargs.items()} if kwargs else tuple(dim(a) for a in args)
        try:
            return torch.export.export(model, args, kwargs or None, dynamic_shapes=dynamic, **extra)
        except Exception:  # the graph specialized the batch size
            pass
    return torch.export.export(model, args, kwargs or None, **extra)


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

    if example_input is None or not isinstance(model, torch.nn.Module):
        return None
    if any(type(p) not in (torch.Tensor, torch.nn.Parameter) for p in model.parameters()):
        return None  # quantized tensor subclasses run int8 kernels the counter does not see
    try:
        counter = FlopCounterMode(display=False)
        with torch.no_grad(), counter:
            call_model(model, example_input)
        flops = int(counter.get_total_flops())
    except Exception:
        return None
    return flops or None  # 0 means the work ran outside torch (OpenVINO): not counted, not free


def measure_latency(fn: Callable[[], Any], warmup: int = 3, repeats: int = 30, budget_s: float | None = None,
                    sync: Callable[[], None] | None = None, runtime: str = "eager") -> Latency:
    """Run ``fn`` ``warmup`` times, then up to ``repeats`` times (or ``budget_s`` seconds: half the
    :func:`timing_budget`)."""
    budget_s = timing_budget() / 2 if budget_s is None else budget_s
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
    return Latency.of(times, runtime)


#: Graphs Dynamo may keep for one class's ``forward`` in a process (see :func:`compiled_for_inference`).
MODELS_COMPILED_PER_PROCESS = 128


def compiled_for_inference(model: Any) -> Any:
    """``torch.compile(model)`` with inductor freezing (weights folded as constants), as every model-opt compile
    runs. Freezing is switched on for the process, not only around the first calls: a later call that recompiles
    (new shapes, or inputs made inside ``torch.inference_mode``, which Dynamo guards on) would otherwise compile
    without it, and an int8 graph compiled without freezing runs float matmuls between quantize steps, slower than
    the float model. Freezing applies only to graphs compiled without gradients, so training compiles are
    unaffected.

    Every model of one class shares its ``forward``'s code, and Dynamo keeps at most ``recompile_limit`` graphs
    per code (8 by default; a dead model's stay counted): the ninth model of a class compiled in one process (an
    autotune search, its finalists re-built, a per-layer search of wrappers) would run eager, silently. The limit
    is raised for the process."""
    import torch
    import torch._dynamo.config as dynamo_config
    import torch._inductor.config as inductor_config

    inductor_config.freezing = True
    dynamo_config.recompile_limit = max(dynamo_config.recompile_limit, MODELS_COMPILED_PER_PROCESS)
    return torch.compile(model)


def compile_model(model: Any, example_input: Any) -> tuple[Any, float]:
    """:func:`compiled_for_inference`, its first calls (which compile) made here so that the seconds returned are
    the one-time compile cost; returns (compiled, seconds)."""
    import torch

    started = time.perf_counter()
    compiled = compiled_for_inference(model)
    with torch.inference_mode():
        call_model(compiled, example_input)
        call_model(compiled, example_input)
    return compiled, time.perf_counter() - started


#: Seconds one before/after timing may take once its fewest rounds are done (MODEL_OPT_TIMING_S sets it).
TIMING_S = 6.0


def timing_budget() -> float:
    """Seconds one before/after timing may take (after its fewest rounds): MODEL_OPT_TIMING_S, else
    :data:`TIMING_S`. Less gives quicker runs and noisier figures (a smoke test); a bad value is a one-line
    error."""
    text = os.environ.get("MODEL_OPT_TIMING_S", "").strip()
    if not text:
        return TIMING_S
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not (0 < value <= 3600):
        from .errors import UsageError

        raise UsageError(f"MODEL_OPT_TIMING_S={text[:20]!r} is not a number of seconds above 0 and up to 3600",
                         f"set it like MODEL_OPT_TIMING_S={TIMING_S:g}, or unset it")
    return value


#: Seconds each model runs for in a row before the timer switches to the next one.
BLOCK_S = 0.15
#: Seconds of idle before a model's block, so that the previous runtime's worker threads (OpenMP spin-wait,
#: OpenVINO's own pool) have stopped spinning on the cores this one needs.
SETTLE_S = 0.05


def rotating_rounds(blocks: dict[str, Callable[[], list[float]]], *, rounds: int = 9, min_rounds: int = 4,
                    budget_s: float | None = None) -> dict[str, Timings]:
    """The one timer behind every comparison, in this process or across processes: each candidate's ``block()``
    runs it alone for a block of calls and returns their milliseconds; rounds give every candidate one block, in
    an order that rotates from round to round, so that a drift of a shared machine hits every candidate alike. At
    least ``min_rounds`` rounds, then up to ``rounds`` or ``budget_s`` seconds (default :func:`timing_budget`)."""
    budget_s = timing_budget() if budget_s is None else budget_s
    timings = {name: Timings() for name in blocks}
    names = list(blocks)
    started = time.perf_counter()
    index = 0
    while index < rounds and (index < min_rounds or time.perf_counter() - started < budget_s):
        shift = index % len(names)
        for name in names[shift:] + names[:shift]:
            block = blocks[name]()
            timings[name].samples += block
            timings[name].rounds_ms.append(statistics.median(block))
        index += 1
    return timings


def timed_block(fn: Callable[[], Any], sync: Callable[[], None] | None = None, block_s: float = BLOCK_S
                ) -> list[float]:
    """One block of calls of ``fn``, as a deployed model runs them: the first call (which wakes the runtime's
    threads after the others ran) untimed, then at least ``block_s`` seconds and 3 calls; their milliseconds."""
    def once() -> None:
        fn()
        if sync:
            sync()

    once()
    started = time.perf_counter()
    times: list[float] = []
    while len(times) < 3 or time.perf_counter() - started < block_s:
        t0 = time.perf_counter()
        once()
        times.append((time.perf_counter() - t0) * 1000)
    return times


def timed_blocks(candidates: dict[str, Callable[[], Any]], *, rounds: int = 9, min_rounds: int = 4,
                 budget_s: float | None = None, warmup: int = 3, sync: Callable[[], None] | None = None
                 ) -> dict[str, Timings]:
    """Candidates in this process, each timed as it is deployed, alone on the machine, in
    :func:`rotating_rounds`, a :func:`timed_block` at a time. Before each block the machine idles :data:`SETTLE_S`
    and the first call after the switch is not timed: two runtimes called alternately on a few cores slow each
    other (each one's thread pool spins on cores the other needs), which a user running one model never sees."""
    for fn in candidates.values():
        for _ in range(warmup):
            fn()
    if sync:
        sync()

    def block_of(fn: Callable[[], Any]) -> Callable[[], list[float]]:
        def block() -> list[float]:
            if len(candidates) > 1:
                time.sleep(SETTLE_S)
            return timed_block(fn, sync)
        return block

    return rotating_rounds({name: block_of(fn) for name, fn in candidates.items()}, rounds=rounds,
                           min_rounds=min_rounds, budget_s=budget_s)


def interleaved_ms(candidates: dict[str, Callable[[], Any]], rounds: int = 7, warmup: int = 2,
                   sync: Callable[[], None] | None = None) -> dict[str, float]:
    """Median milliseconds per call of each candidate (see :func:`timed_blocks`); used to compare candidates
    against each other."""
    import torch

    with torch.inference_mode():
        timings = timed_blocks(candidates, rounds=rounds, warmup=warmup, sync=sync)
    return {name: statistics.median(t.samples) for name, t in timings.items()}


def model_latency(model: Any, example_input: Any, device: str, runtime: str = "eager") -> Latency:
    import torch

    sync = torch.cuda.synchronize if device.startswith("cuda") else None

    def run() -> None:
        with torch.inference_mode():
            call_model(model, example_input)

    return measure_latency(run, sync=sync, runtime=runtime)
