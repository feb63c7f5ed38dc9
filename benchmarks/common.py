"""Shared helpers for the benchmark scripts: interleaved timing in one process, ratio tables.

Absolute times on a shared 2-core machine are noise; the scripts print ratios of candidates measured
side by side, interleaved round by round so that drifts hit every candidate alike.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch


def compiled(model: torch.nn.Module, example: Any) -> torch.nn.Module:
    """torch.compile with inductor freezing (weights as constants), warmed up once."""
    import torch._inductor.config as inductor_config

    inductor_config.freezing = True
    compiled_model = torch.compile(model)
    with torch.inference_mode():
        compiled_model(example)
    return compiled_model


def time_interleaved(candidates: dict[str, Callable[[], Any]], rounds: int = 7,
                     warmup: int = 2) -> dict[str, float]:
    """Median milliseconds per call of each candidate, measured in interleaved rounds (model-opt's own)."""
    from model_opt.measure import interleaved_ms

    return interleaved_ms(candidates, rounds=rounds, warmup=warmup)


def table(title: str, rows: list[dict[str, Any]]) -> str:
    """A markdown table (also readable on a terminal)."""
    headers = list(rows[0])
    lines = [f"### {title}", "", "| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    for row in rows:
        lines.append("| " + " | ".join(_fmt(row[h]) for h in headers) + " |")
    return "\n".join(lines) + "\n"


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3f}" if abs(value) < 100 else f"{value:.0f}"
    return str(value)


def machine() -> str:
    """The machine every figure comes from: model-opt's device profile (CPU model, instruction sets, cores,
    memory, GPUs) and torch's threads."""
    from model_opt.device import device_profile

    device = "cuda" if torch.cuda.is_available() else "cpu"
    return f"{device_profile().describe(device)}; torch {torch.__version__}, {torch.get_num_threads()} threads"


def int8_capability() -> str:
    """Whether int8 matmuls can beat float on this CPU (its int8 dot-product instructions)."""
    from model_opt.device import device_profile

    fast = device_profile().has("int8 dot products")
    return "int8 dot products (VNNI/AMX)" if fast else "no VNNI/AMX (int8 matmuls slower than float)"


def params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return torch.nn.functional.cosine_similarity(a.flatten().float(), b.flatten().float(), dim=0).item()


def time_models(models: dict[str, torch.nn.Module], example: Any, **kwargs: Any) -> dict[str, float]:
    """:func:`time_interleaved` over models called on the same example input."""
    from functools import partial

    from model_opt.measure import call_model

    return time_interleaved({name: partial(call_model, model, example) for name, model in models.items()},
                            **kwargs)


def recommended(model: Path, out: str, data_flags: list[str]) -> tuple[list[str], dict]:
    """``model-opt recommend``'s first command for the model (given ``data_flags``: --test-dataset and the like),
    run as printed with ``--output out`` (a folder when it ends in /): (its flags after the model, its report,
    with ``output``). Where the first is a runtime (``model-opt export ... --report``: no technique pays on this
    CPU), the export's report (when it wrote one), with ``output`` (the exported file, in ``out``) and ``format``."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    printed = subprocess.run([sys.executable, "-m", "model_opt_cli.main", "recommend", str(model), *data_flags],
                             capture_output=True, text=True, check=True, env=env).stdout
    command = next(line.split() for line in printed.splitlines()
                   if line.strip().startswith(("model-opt optimize", "model-opt export")))
    flags = command[command.index(str(model)) + 1:]
    if command[1] == "export":
        from model_opt.outputs import EXPORT_SUFFIXES, report_path

        fmt = flags[flags.index("--format") + 1]
        target = Path(out) / f"model{EXPORT_SUFFIXES[fmt]}"
        target.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, "-m", "model_opt_cli.main", "export", str(model), *flags, "--output",
                        str(target)], capture_output=True, text=True, check=True, env=env)
        written = report_path(target)
        report = json.loads(written.read_text()) if written.exists() else {}
        return ["export", *flags], {**report, "output": str(target), "format": fmt}
    proc = subprocess.run([sys.executable, "-m", "model_opt_cli.main", "optimize", str(model), *flags,
                           "--output", out, "--json", "-q"], capture_output=True, text=True, check=True,
                          env=env)
    return flags, {**json.loads(proc.stdout), "output": out.rstrip("/")}
