"""torchao quantization through model-opt: latency ratios eager and compiled, size ratio, output cosine.

    python benchmarks/quantization.py [--models mlp,vit_small,resnet18]

Every candidate is timed in the same process, interleaved with float eager and float compiled.
"torchao direct" applies the same config by calling torchao's quantize_ ourselves: model-opt's result
must match it.
"""

from __future__ import annotations

import argparse
import copy
import io
import os
import sys
import tempfile

import timm
import torch
from torch import nn

sys.path.insert(0, os.path.dirname(__file__))
from common import compiled, cosine, machine, table, time_models  # noqa: E402
from model_opt.techniques import Quantizer  # noqa: E402


def size(model: nn.Module) -> int:
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    return buffer.tell()


def subjects(names: list[str]) -> list[tuple[str, nn.Module, torch.Tensor]]:
    torch.manual_seed(0)
    out = []
    if "mlp" in names:
        mlp = nn.Sequential(*[nn.Sequential(nn.Linear(1024, 1024), nn.ReLU()) for _ in range(4)]).eval()
        out.append(("4x Linear(1024,1024) b32", mlp, torch.randn(32, 1024)))
    if "vit_small" in names:
        out.append(("vit_small_patch16_224 b8", timm.create_model("vit_small_patch16_224").eval(),
                    torch.randn(8, 3, 224, 224)))
    if "resnet18" in names:
        out.append(("resnet18 b8", timm.create_model("resnet18").eval(), torch.randn(8, 3, 224, 224)))
    return out


def rows_for(label: str, model: nn.Module, x: torch.Tensor) -> list[dict]:
    from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_

    eager: dict[str, nn.Module] = {"float": model}
    for method in ("int8_weight_only", "int8_dynamic"):
        eager[method] = Quantizer().quantize(copy.deepcopy(model), method=method, example_input=x,
                                             skip_head=False)[0]
    direct = copy.deepcopy(model)
    quantize_(direct, Int8DynamicActivationInt8WeightConfig())
    eager["int8_dynamic (torchao direct)"] = direct
    eager["autoquant (tuned eager)"] = Quantizer().quantize(copy.deepcopy(model), method="autoquant",
                                                            example_input=x, skip_head=False)[0]
    tuned_compiled = Quantizer().quantize(copy.deepcopy(model), method="autoquant", example_input=x,
                                          skip_head=False, compile=True)[0]
    eager_times = time_models(eager, x, rounds=5)
    compiled_models = {name: compiled(m, x) for name, m in eager.items() if "autoquant" not in name}
    compiled_models["autoquant (tuned compiled)"] = compiled(tuned_compiled, x)
    eager["autoquant (tuned compiled)"] = tuned_compiled
    compiled_times = time_models(compiled_models, x, rounds=5)
    sizes = {name: size(candidate) for name, candidate in eager.items()}
    with torch.inference_mode():
        reference = model(x)
        rows = []
        for name, candidate in eager.items():
            agreement = cosine(candidate(x), reference)
            for runtime, times in (("eager", eager_times), ("compiled", compiled_times)):
                if name not in times:
                    continue
                rows.append({"model": label, "method": name, "runtime": runtime,
                             "vs float eager": eager_times["float"] / times[name],
                             "vs float compiled": compiled_times["float"] / times[name],
                             "size ratio": sizes[name] / sizes["float"], "output cosine": agreement})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--models", default="mlp,vit_small,resnet18")
    args = parser.parse_args()
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", tempfile.mkdtemp(prefix="model-opt-bench-"))
    print(f"machine: {machine()}\n")
    rows = []
    for label, model, x in subjects(args.models.split(",")):
        rows += rows_for(label, model, x)
    print(table("torchao int8 (random weights); ratios are speed-ups (>1 is faster)", rows))


if __name__ == "__main__":
    main()
