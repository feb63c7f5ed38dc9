"""CUDA rows: torchao int8/int4/float8 and the Linear+GELU epilogue against bf16, on one GPU.

    python benchmarks/gpu.py            # run (needs a CUDA GPU)
    python benchmarks/gpu.py --list     # print the rows it would measure, run nothing

Each table times the bf16 baseline and the candidates in one process, interleaved (CUDA-synchronized),
and prints ratios: batch-1 decode of a Linear stack (where weight-only int8/int4 should win), a large
batch (where float8 dynamic should win on compute capability 8.9+), and Linear+GELU fused vs unfused.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(__file__))
from common import cosine, table  # noqa: E402

ROWS = {
    "decode": "4x Linear(4096,4096) bf16, batch 1: int8_weight_only, int4_weight_only vs bf16 (all compiled)",
    "prefill": "4x Linear(4096,4096) bf16, batch 2048: int8_dynamic, float8_dynamic vs bf16 (all compiled)",
    "epilogue": "Linear(4096,16384)+GELU(tanh) bf16, batch 512: LinearGELU (cuBLASLt epilogue) vs unfused, eager",
}


def stack() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(*[nn.Linear(4096, 4096) for _ in range(4)]).to("cuda", torch.bfloat16).eval()


def timed(models: dict[str, nn.Module], x: torch.Tensor) -> dict[str, float]:
    from model_opt.measure import interleaved_ms

    calls = {name: (lambda m=m: m(x)) for name, m in models.items()}
    return interleaved_ms(calls, rounds=9, warmup=5, sync=torch.cuda.synchronize)


def compiled(model: nn.Module, x: torch.Tensor) -> nn.Module:
    import torch._inductor.config as inductor_config

    inductor_config.freezing = True
    out = torch.compile(model, mode="max-autotune-no-cudagraphs")
    with torch.inference_mode():
        out(x)
        out(x)
    return out


def quantized(method: str, x: torch.Tensor) -> nn.Module:
    from model_opt.techniques import Quantizer

    model, _ = Quantizer().quantize(stack(), method=method, example_input=x, skip_head=False)
    return model


def quant_table(name: str, batch: int, methods: list[str]) -> str:
    x = torch.randn(batch, 4096, device="cuda", dtype=torch.bfloat16)
    base = stack()
    with torch.no_grad():
        reference = base(x)
    models = {"bf16": compiled(base, x)}
    notes = {"bf16": ""}
    for method in methods:
        try:
            model = quantized(method, x)
            with torch.no_grad():
                notes[method] = f"cosine {cosine(model(x), reference):.4f}"
            models[method] = compiled(model, x)
        except Exception as exc:  # a kernel this GPU lacks: say so in the table
            notes[method] = f"failed: {str(exc).splitlines()[0][:80]}"
    times = timed(models, x)
    rows = [{"candidate": n, "ms": times[n], "speed-up vs bf16": times["bf16"] / times[n], "note": notes[n]}
            for n in times]
    rows += [{"candidate": m, "ms": float("nan"), "speed-up vs bf16": float("nan"), "note": notes[m]}
             for m in methods if m not in times]
    return table(f"{ROWS[name]} ({torch.cuda.get_device_name()})", rows)


def epilogue_table() -> str:
    from model_opt.techniques import LayerFuser

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4096, 16384), nn.GELU(approximate="tanh")).to("cuda", torch.bfloat16).eval()
    x = torch.randn(512, 4096, device="cuda", dtype=torch.bfloat16)
    fused = LayerFuser().fuse_linear_gelu(copy.deepcopy(model))
    with torch.no_grad():
        note = f"max abs diff {(fused(x) - model(x)).abs().max().item():.3g}"
        times = timed({"unfused": model, "LinearGELU": fused}, x)
    rows = [{"candidate": n, "ms": t, "speed-up": times["unfused"] / t, "note": note if n != "unfused" else ""}
            for n, t in times.items()]
    return table(f"{ROWS['epilogue']} ({torch.cuda.get_device_name()})", rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--list", action="store_true", help="print the rows and exit")
    args = parser.parse_args()
    if args.list:
        for name, what in ROWS.items():
            print(f"benchmarks/gpu.py {name}: {what}")
        return
    if not torch.cuda.is_available():
        sys.exit("benchmarks/gpu.py needs a CUDA GPU; use --list to see what it measures")
    print(f"GPU: {torch.cuda.get_device_name()} (compute capability "
          f"{'.'.join(map(str, torch.cuda.get_device_capability()))}), torch {torch.__version__}\n")
    with torch.inference_mode():
        print(quant_table("decode", 1, ["int8_weight_only", "int4_weight_only"]))
        print(quant_table("prefill", 2048, ["int8_dynamic", "float8_dynamic"]))
        print(epilogue_table())


if __name__ == "__main__":
    main()
