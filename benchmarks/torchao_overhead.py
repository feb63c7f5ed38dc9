"""model-opt's torchao int8_dynamic against torchao's quantize_ called directly, same configuration.

    python benchmarks/torchao_overhead.py

Three candidates in the same interleaved rounds: model-opt's result, torchao's, and a second torchao
copy (the noise floor: two identical models). Prints time ratios to torchao's, eager and compiled.
"""

from __future__ import annotations

import copy
import os
import sys

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(__file__))
from common import compiled, int8_capability, machine, table, time_models  # noqa: E402


def main() -> None:
    from model_opt.techniques import Quantizer
    from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_

    torch.manual_seed(0)
    mlp = nn.Sequential(*[nn.Sequential(nn.Linear(1024, 1024), nn.ReLU()) for _ in range(4)]).eval()
    x = torch.randn(32, 1024)
    ours = Quantizer().quantize(copy.deepcopy(mlp), method="int8_dynamic", example_input=x, skip_head=False)[0]
    direct, again = copy.deepcopy(mlp), copy.deepcopy(mlp)
    quantize_(direct, Int8DynamicActivationInt8WeightConfig())
    quantize_(again, Int8DynamicActivationInt8WeightConfig())
    rows = []
    for runtime in ("eager", "compiled"):
        models = {"model-opt": ours, "torchao direct": direct, "torchao direct, second copy": again}
        if runtime == "compiled":
            models = {name: compiled(m, x) for name, m in models.items()}
        times = time_models(models, x, rounds=40)
        rows += [{"runtime": runtime, "candidate": name, "time / torchao direct": t / times["torchao direct"]}
                 for name, t in times.items()]
    print(f"{machine()}; CPU int8: {int8_capability()}\n")
    print(table("4x Linear(1024,1024) b32, int8_dynamic: model-opt vs torchao direct", rows))


if __name__ == "__main__":
    main()
