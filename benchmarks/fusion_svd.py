"""Fusion and SVD: latency and parameter ratios, baseline and candidate side by side in one process.

    python benchmarks/fusion_svd.py [--no-compile]
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import tempfile

import timm
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(__file__))
from common import compiled, cosine, machine, params, table, time_interleaved, time_models  # noqa: E402
from model_opt.techniques import Decomposer, LayerFuser  # noqa: E402


def fusion_rows(compile_too: bool) -> list[dict]:
    rows = []
    for name, batch in (("resnet18", 8), ("resnet50", 4)):
        torch.manual_seed(0)
        model = timm.create_model(name, pretrained=False).eval()
        x = torch.randn(batch, 3, 224, 224)
        fused = LayerFuser().fuse_conv_bn_relu(copy.deepcopy(model))
        with torch.inference_mode():
            agreement = cosine(fused(x), model(x))
        times = time_models({"unfused": model, "fused": fused}, x)
        rows.append({"model": f"{name} b{batch}", "runtime": "eager", "fused/unfused latency":
                     times["fused"] / times["unfused"], "speed-up": times["unfused"] / times["fused"],
                     "output cosine": agreement})
        if compile_too and name == "resnet18":
            c_model, c_fused = compiled(model, x), compiled(fused, x)
            times = time_models({"unfused": c_model, "fused": c_fused}, x)
            rows.append({"model": f"{name} b{batch}", "runtime": "compiled (freezing)",
                         "fused/unfused latency": times["fused"] / times["unfused"],
                         "speed-up": times["unfused"] / times["fused"], "output cosine": agreement})
    return rows


def linear_gelu_rows() -> list[dict]:
    from model_opt_fusion.folding import LinearGELU

    torch.manual_seed(0)
    linear = torch.nn.Linear(768, 3072)
    fused = LinearGELU(linear)
    x = torch.randn(8 * 197, 768)
    times = time_interleaved({"linear+gelu": lambda: F.gelu(linear(x)), "LinearGELU": lambda: fused(x)})
    return [{"shape": "ViT-B MLP fc1 768->3072, 1576 tokens", "fused/unfused latency":
             times["LinearGELU"] / times["linear+gelu"]}]


def svd_rows() -> list[dict]:
    rows = []
    torch.manual_seed(0)
    model = timm.create_model("vit_small_patch16_224", pretrained=False).eval()
    x = torch.randn(8, 3, 224, 224)
    candidates = {"float": model}
    for ratio in (0.5, 0.25):
        candidates[f"svd {ratio}"] = Decomposer().decompose_model(copy.deepcopy(model), rank_ratio=ratio,
                                                                  exclude=["head"])
    times = time_models(candidates, x, rounds=5)
    for name, candidate in candidates.items():
        if name == "float":
            continue
        rows.append({"vit_small b8": name, "params ratio": params(candidate) / params(model),
                     "latency ratio": times[name] / times["float"], "speed-up": times["float"] / times[name]})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--no-compile", action="store_true", help="skip the compiled rows (slow to compile)")
    args = parser.parse_args()
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", tempfile.mkdtemp(prefix="model-opt-bench-"))
    print(f"machine: {machine()}\n")
    print(table("Conv-BN folding (timm, random weights), fused against unfused", fusion_rows(not args.no_compile)))
    print(table("Linear+GELU", linear_gelu_rows()))
    print(table("SVD on vit_small_patch16_224 (random weights; head excluded)", svd_rows()))


if __name__ == "__main__":
    main()
