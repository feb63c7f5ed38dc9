"""Time models as they are deployed: each in a process of its own, in interleaved rounds.

Two runtimes in one process slow each other even when only one of them runs (each keeps a thread pool on
the same few cores), so a model timed beside another is not the model a user deploys. Here every candidate
is loaded by a worker process of its own (``python -m model_opt.timing``), from a file, the way a user
reopens it; the parent asks each worker in turn for a block of calls (rounds rotate, so a drift of a shared
machine hits every candidate alike) while the others wait on a pipe, idle.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from .errors import ModelOptError, UsageError, describe
from .measure import BLOCK_S, Timings, call_model, compile_model, rotating_rounds, timed_block, timing_budget

PREFIX = "MODEL_OPT_TIMING "
#: The request a worker answers with one timed greedy generation (tokens/s) instead of a block of calls.
DECODE_REQUEST = "decode"
#: Rounds of :func:`decode_deployed` (one generation per candidate each).
DECODE_ROUNDS = 3


@dataclass
class Deployed:
    """How a worker opens a candidate: a model file (or folder), opened like ``model_opt.load`` does."""

    path: str
    test_script: str | None = None
    trust_model: bool = False
    compile: bool = False
    #: The MODEL the user gave and whether the run measures compiled: the test script's hooks get them as the
    #: job passes them (``model_path``, ``compiled``).
    model_path: str | None = None
    run_compiled: bool = False

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class Worker:
    """One candidate in its own process, answering 'block' requests with milliseconds per call."""

    def __init__(self, deployed: Deployed, example_file: Path, device: str, threads: int) -> None:
        spec = {**deployed.to_dict(), "example": str(example_file), "device": device, "threads": threads}
        self.errors = tempfile.TemporaryFile(mode="w+")  # (a pipe could fill up and block a chatty backend)
        self.proc = subprocess.Popen([*worker_command("model_opt.timing"), json.dumps(spec)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.errors,
                                     text=True, bufsize=1)
        try:
            self.read()  # ready (loaded, warmed up)
        except BaseException:
            self.close()
            raise

    def read(self) -> Any:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if line.startswith(PREFIX):
                return json.loads(line[len(PREFIX):])
        self.proc.wait()
        self.errors.seek(0)
        raise ModelOptError(f"the timing process failed ({failure(self.errors.read())})",
                            "set MODEL_OPT_TIMING=inline to time in this process")

    def block(self, block_s: float) -> list[float]:
        return self.ask(str(block_s))

    def decode(self) -> Any:
        """One timed greedy generation of the built-in evaluation's length (a causal LM): its
        :class:`model_opt.builtin.lm_eval.Decode`."""
        from .builtin.lm_eval import Decode

        return Decode(**self.ask(DECODE_REQUEST))

    def ask(self, request: str) -> Any:
        assert self.proc.stdin is not None
        self.proc.stdin.write(f"{request}\n")
        self.proc.stdin.flush()
        return self.read()

    def close(self) -> None:
        with contextlib.suppress(Exception):
            if self.proc.stdin:
                self.proc.stdin.close()
            self.proc.wait(timeout=10)
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        if self.proc.stdout:
            self.proc.stdout.close()
        self.errors.close()


def time_deployed(candidates: dict[str, Deployed], example: Any, device: str = "cpu", *, rounds: int = 9,
                  min_rounds: int = 4, budget_s: float | None = None) -> dict[str, Timings]:
    """Milliseconds per call of each candidate, each loaded and run in its own process (see the module), in the
    rounds of :func:`model_opt.measure.rotating_rounds` (the timer every comparison uses); the rounds after the
    fewest take up to ``budget_s`` seconds (default: a third more than an in-process timing's
    :func:`model_opt.measure.timing_budget`, for the pipes between the processes)."""

    budget_s = timing_budget() * 4 / 3 if budget_s is None else budget_s
    with started_workers(candidates, example, device) as workers:
        return rotating_rounds({name: (lambda w=worker: w.block(BLOCK_S)) for name, worker in workers.items()},
                               rounds=rounds, min_rounds=min_rounds, budget_s=budget_s)


@contextlib.contextmanager
def started_workers(candidates: dict[str, Deployed], example: Any, device: str) -> Any:
    """A ready :class:`Worker` for each candidate (the example saved once for all of them); closed on exit."""
    import torch

    workers: dict[str, Worker] = {}
    with tempfile.TemporaryDirectory(prefix="model-opt-timing-") as tmp:
        example_file = Path(tmp) / "example.pt"
        torch.save(example, example_file)
        try:
            for name, deployed in candidates.items():
                workers[name] = Worker(deployed, example_file, device, torch.get_num_threads())
            yield workers
        finally:
            for worker in workers.values():
                worker.close()


def decode_deployed(candidates: dict[str, Deployed], example: Any, device: str = "cpu", *,
                    rounds: int = DECODE_ROUNDS) -> dict[str, Any]:
    """The decode of each causal LM candidate (eager; :class:`model_opt.builtin.lm_eval.Decode`), each opened in
    its own process as :func:`time_deployed` opens them: one greedy generation per candidate per round, the order
    rotating; the round of median tokens/s."""
    rates: dict[str, list[Any]] = {name: [] for name in candidates}
    eager = {name: dataclasses.replace(deployed, compile=False) for name, deployed in candidates.items()}
    with started_workers(eager, example, device) as workers:
        names = list(workers)
        for round_ in range(rounds):
            for name in names[round_ % len(names):] + names[:round_ % len(names)]:
                rates[name].append(workers[name].decode())
    return {name: sorted(found, key=lambda d: d.tokens_per_s)[len(found) // 2] for name, found in rates.items()}


def runtime_of(model: Any) -> str:
    """The runtime a model runs in: ``torch``, or what it declares (an OpenVINO model says ``openvino``)."""
    return str(getattr(model, "deployed_runtime", "torch"))


def in_processes(before: Any, after: Any) -> bool:
    """Whether to time in worker processes: when the two run in different runtimes (which slow each other in
    one process), or MODEL_OPT_TIMING=process; never with MODEL_OPT_TIMING=inline."""
    choice = timing_choice()
    if choice:
        return choice == "process"
    return runtime_of(before) != runtime_of(after)


def timing_choice() -> str:
    """MODEL_OPT_TIMING: ``inline``, ``process``, or unset (""); anything else is a one-line error."""
    choice = os.environ.get("MODEL_OPT_TIMING", "").strip().lower()
    if choice not in ("", "inline", "process"):
        raise UsageError(f"MODEL_OPT_TIMING={choice[:20]!r} is not inline or process",
                         "set MODEL_OPT_TIMING=inline (time in this process) or process (each model in its own), or "
                         "unset it")
    return choice


def open_deployed(spec: dict[str, Any]) -> tuple[Any, Any]:
    """In a worker: the model of a :class:`Deployed` spec opened as the job opens a model (the test script's
    hooks called as the job calls them), compiled when the spec says so, and the example input, both on the
    spec's device."""
    import torch

    from .modelio import open_model
    from .testscript import TestScript

    torch.set_num_threads(int(spec["threads"]))
    script = TestScript(spec["test_script"], model_path=spec.get("model_path"),
                        compiled=bool(spec.get("run_compiled"))) if spec.get("test_script") else None
    model = open_model(Path(spec["path"]), script, bool(spec["trust_model"]))
    if hasattr(model, "to") and not spec["path"].endswith(".xml"):
        model = model.to(spec["device"])
    if hasattr(model, "eval"):
        model = model.eval()
    example = torch.load(spec["example"], weights_only=True, map_location=spec["device"])
    if spec["compile"]:
        model = compile_model(model, example)[0]
    return model, example


def _serve(spec: dict[str, Any]) -> None:
    """The worker: open the model, warm it up, then answer each block request on stdin."""
    import torch

    sync = torch.cuda.synchronize if str(spec["device"]).startswith("cuda") else None
    model, example = open_deployed(spec)

    def call() -> None:
        call_model(model, example)

    with torch.inference_mode():
        for _ in range(3):
            call()
        print(PREFIX + json.dumps("ready"), flush=True)
        warmed = False
        for line in sys.stdin:  # (the machine idled while the other candidates ran their blocks)
            if line.strip() == DECODE_REQUEST:
                from .builtin.lm_eval import _time_decode

                answer: Any = dataclasses.asdict(_time_decode(model, example["input_ids"], runs=1,
                                                              warm_up=not warmed))
                warmed = True
            else:
                answer = timed_block(call, sync, float(line))
            print(PREFIX + json.dumps(answer), flush=True)


def failure(stderr: str) -> str:
    """What a failed worker said: the last line of its stderr (:func:`run_worker` writes it)."""
    lines = [x for x in stderr.strip().splitlines() if x.strip()]
    return lines[-1][:200] if lines else "no message"


def worker_command(module: str) -> list[str]:
    """The command that starts a worker process running ``module``: isolated, so that nothing in the working
    directory is importable there (``python -m`` would put it first on sys.path, ahead of the standard
    library); ``-P`` keeps PYTHONPATH, ``-I`` (before Python 3.11) drops it too."""
    return [sys.executable, "-P" if sys.version_info >= (3, 11) else "-I", "-m", module]


def run_worker(serve: Any) -> None:
    """A worker process's entry point: ``serve`` the JSON spec of its argument; a failure ends it with one line
    on stderr, which the parent shows. The working directory is not importable while models load here."""
    from .sources import isolate_from_working_directory

    isolate_from_working_directory()
    try:
        serve(json.loads(sys.argv[1]))
    except Exception as exc:
        print(describe(exc), file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    run_worker(_serve)
