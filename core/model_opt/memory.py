"""Peak memory of a model as deployed: a fresh process opens the saved model the way a user reopens it, runs
it (a causal LM decodes greedily, as the built-in evaluation times it; other models run the example input),
and reports the process's peak resident memory (the runtime, the model while it loads, and its working
memory). Candidates run one after another, never side by side, so they do not compete for memory.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from .errors import ModelOptError
from .measure import call_model
from .timing import Deployed, failure, open_deployed, run_worker, worker_command

PREFIX = "MODEL_OPT_MEMORY "


def peak_memory(candidates: dict[str, Deployed], example: Any, device: str = "cpu", *, decode: bool = False,
                timeout_s: float = 900.0) -> dict[str, int]:
    """Peak resident bytes of each candidate's own process (see the module); ``decode``: greedy decoding of
    the built-in evaluation's length after the example's ``input_ids``."""
    import torch

    peaks: dict[str, int] = {}
    with tempfile.TemporaryDirectory(prefix="model-opt-memory-") as tmp:
        example_file = Path(tmp) / "example.pt"
        torch.save(example, example_file)
        for name, deployed in candidates.items():
            spec = {**deployed.to_dict(), "example": str(example_file), "device": device,
                    "threads": torch.get_num_threads(), "decode": decode}
            try:
                done = subprocess.run([*worker_command("model_opt.memory"), json.dumps(spec)], text=True,
                                      capture_output=True, timeout=timeout_s)
            except subprocess.TimeoutExpired as exc:
                raise ModelOptError(f"measuring the peak memory of {name} took over {timeout_s:.0f}s",
                                    "free the machine and run again") from exc
            lines = [x for x in done.stdout.splitlines() if x.startswith(PREFIX)]
            if done.returncode != 0 or not lines:
                raise ModelOptError(f"the memory process for {name} failed ({failure(done.stderr)})",
                                    "run it again; if it fails again, report it with this message")
            peaks[name] = int(json.loads(lines[-1][len(PREFIX):]))
    return peaks


def peak_resident_bytes() -> int:
    """This process's peak resident memory so far (Linux: VmHWM; elsewhere: ru_maxrss)."""
    status = Path("/proc/self/status")
    if status.is_file():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def _serve(spec: dict[str, Any]) -> None:
    """The worker: open the model, run it, print the peak."""
    import torch

    model, example = open_deployed(spec)
    with torch.inference_mode():
        if spec["decode"]:
            from .builtin.lm_eval import _time_decode

            _time_decode(model, example["input_ids"])
        else:
            for _ in range(2):
                call_model(model, example)
    print(PREFIX + json.dumps(peak_resident_bytes()), flush=True)


if __name__ == "__main__":
    run_worker(_serve)
