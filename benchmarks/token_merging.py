"""Token merging: ToMe on timm ViT-B and ToMeSD on diffusers UNets, throughput ratios in one process.

    python benchmarks/token_merging.py [--skip-sd15]
"""

from __future__ import annotations

import argparse
import copy
import os
import sys

import timm
import torch

sys.path.insert(0, os.path.dirname(__file__))
from common import cosine, machine, table, time_interleaved, time_models  # noqa: E402
from model_opt.techniques.pruning.pruning_sd import StableDiffusionPruner  # noqa: E402
from model_opt.techniques.pruning.pruning_vit_tome import ViTToMePruner  # noqa: E402

SMALL_UNET = {
    "sample_size": 32, "in_channels": 4, "out_channels": 4, "layers_per_block": 1,
    "block_out_channels": (64, 128), "down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D"), "cross_attention_dim": 64,
    "attention_head_dim": 8, "norm_num_groups": 32,
}
SD15_UNET = {
    "sample_size": 64, "in_channels": 4, "out_channels": 4, "layers_per_block": 2,
    "block_out_channels": (320, 640, 1280, 1280),
    "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    "cross_attention_dim": 768, "attention_head_dim": 8,
}


def vit_rows() -> list[dict]:
    torch.manual_seed(0)
    model = timm.create_model("vit_base_patch16_224", pretrained=False).eval()
    x = torch.randn(8, 3, 224, 224)
    candidates = {"r=0": model}
    for r in (8, 16):
        candidates[f"r={r}"] = ViTToMePruner().apply_patch(copy.deepcopy(model), r=r)
    times = time_models(candidates, x, rounds=5)
    with torch.inference_mode():
        reference = model(x)
        rows = []
        for name, candidate in candidates.items():
            out = candidate(x)
            rows.append({"vit_base_patch16_224 b8": name, "throughput ratio": times["r=0"] / times[name],
                         "output cosine": cosine(out, reference),
                         "top-1 agreement": (out.argmax(1) == reference.argmax(1)).float().mean().item()})
    return rows


def unet_rows(name: str, config: dict, latent: int, rounds: int) -> list[dict]:
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    base = UNet2DConditionModel(**config).eval()
    latents = torch.randn(2, 4, latent, latent)
    text = torch.randn(2, 77, config["cross_attention_dim"])
    candidates = {"unpatched": base}
    for max_downsample in (1, 2):
        patched = StableDiffusionPruner().apply_patch(copy.deepcopy(base), ratio=0.5, max_downsample=max_downsample)
        candidates[f"ratio 0.5, max_downsample {max_downsample}"] = patched
    calls = {k: (lambda m=m: m(latents, 10, encoder_hidden_states=text).sample) for k, m in candidates.items()}
    times = time_interleaved(calls, rounds=rounds, warmup=1)
    with torch.inference_mode():
        reference = calls["unpatched"]()
        return [{"UNet": f"{name} ({latent}x{latent} latents, b2)", "setting": k,
                 "speed-up": times["unpatched"] / times[k], "output cosine": cosine(fn(), reference)}
                for k, fn in calls.items() if k != "unpatched"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--skip-sd15", action="store_true", help="skip the SD-1.5-sized UNet (slow on CPU)")
    args = parser.parse_args()
    print(f"machine: {machine()}\n")
    print(table("ToMe on timm ViT-B/16 (random weights), eager", vit_rows()))
    rows = unet_rows("small", SMALL_UNET, 32, rounds=5) + unet_rows("small", SMALL_UNET, 64, rounds=5)
    if not args.skip_sd15:
        rows += unet_rows("SD-1.5-sized", SD15_UNET, 64, rounds=2)
    print(table("ToMeSD (random weights), eager", rows))


if __name__ == "__main__":
    main()
