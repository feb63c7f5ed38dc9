"""Structured pruning (torch-pruning) and basic unstructured pruning: parameter, FLOP and latency ratios.

    python benchmarks/pruning.py [--no-compile]
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import tempfile

import timm
import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, os.path.dirname(__file__))
from common import compiled, machine, params, table, time_models  # noqa: E402
from model_opt.techniques import Pruner  # noqa: E402


def flops(model: torch.nn.Module, x: torch.Tensor) -> int:
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model(x)
    return counter.get_total_flops()


def rows_for(name: str, batch: int, compile_too: bool) -> list[dict]:
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False).eval()
    x = torch.randn(batch, 3, 224, 224)
    candidates = {"float": model}
    for amount in (0.3, 0.5):
        candidates[f"structured {amount}"] = Pruner().prune_model(
            copy.deepcopy(model), amount=amount, prune_type="structured", example_input=x[:1])
    candidates["unstructured 0.5"] = Pruner().prune_model(copy.deepcopy(model), amount=0.5, criterion="l1")
    eager = time_models(candidates, x, rounds=5)
    compiled_times = {}
    if compile_too:
        compiled_times = time_models({k: compiled(m, x) for k, m in candidates.items()}, x, rounds=5)
    base_flops = flops(model, x)
    rows = []
    for key, candidate in candidates.items():
        if key == "float":
            continue
        row = {"model": f"{name} b{batch}", "technique": key,
               "params ratio": params(candidate) / params(model),
               "nonzero ratio": sum(int((p != 0).sum()) for p in candidate.parameters()) / params(model),
               "FLOPs ratio": flops(candidate, x) / base_flops,
               "eager speed-up": eager["float"] / eager[key]}
        if compile_too:
            row["compiled speed-up"] = compiled_times["float"] / compiled_times[key]
        rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--no-compile", action="store_true", help="skip the compiled runtime (slow to compile)")
    parser.add_argument("--models", default="resnet18:8,resnet50:4,vit_small_patch16_224:8")
    args = parser.parse_args()
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", tempfile.mkdtemp(prefix="model-opt-bench-"))
    print(f"machine: {machine()}\n")
    rows = []
    for spec in args.models.split(","):
        name, batch = spec.split(":")
        rows += rows_for(name, int(batch), not args.no_compile)
    print(table("Pruning (random weights): ratios against the unpruned model; speed-up = float time / pruned time",
                rows))


if __name__ == "__main__":
    main()
