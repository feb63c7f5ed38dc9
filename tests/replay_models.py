"""Small models and one optimized version of each per technique, for the replay round-trip test.

``BUILDERS[name]()`` returns a fresh (random) copy of the architecture; ``optimize(name)`` returns the
optimized model and the input to compare outputs on.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(64, 128), nn.GELU(), nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, 10)).eval()


def cnn() -> nn.Module:
    import timm

    return timm.create_model("resnet18", pretrained=False, num_classes=10).eval()


def vit() -> nn.Module:
    import timm

    return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=64, num_classes=10).eval()


def unet() -> nn.Module:
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=8, norm_num_groups=8).eval()


def image(size: int = 32) -> torch.Tensor:
    return torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))


def run(model: Any, x: Any) -> torch.Tensor:
    with torch.no_grad():
        if isinstance(x, tuple):  # a UNet: sample, timestep, text states (tomesd reads the sample positionally)
            return model(*x).sample
        return model(x)


CASES: dict[str, tuple[Any, Any]] = {
    "basic": (mlp, lambda: torch.randn(4, 64)),
    "torch-pruning-cnn": (cnn, image),
    "torch-pruning-vit": (vit, lambda: image(64)),
    "svd": (cnn, image),
    "fusion-conv-bn": (cnn, image),
    "fusion-linear-gelu": (vit, lambda: image(64)),
    "tome": (vit, lambda: image(64)),
    "tomesd": (unet, lambda: (torch.randn(1, 4, 16, 16), 10, torch.randn(1, 7, 32))),
    "torchao-int8-weight-only": (mlp, lambda: torch.randn(4, 64)),
    "torchao-int8-dynamic": (mlp, lambda: torch.randn(4, 64)),
    "torchao-autoquant": (mlp, lambda: torch.randn(4, 64)),
    "nncf-int8-static": (cnn, image),
    "inc-int8-static": (cnn, image),
    "inc-weight-only": (mlp, lambda: torch.randn(4, 64)),
    "nncf-prune": (mlp, lambda: torch.randn(4, 64)),
}


def optimize(name: str) -> tuple[Any, Any]:
    from model_opt.techniques import Decomposer, LayerFuser, Pruner, Quantizer
    from model_opt.techniques.pruning.pruning_sd import StableDiffusionPruner
    from model_opt.techniques.pruning.pruning_vit_tome import ViTToMePruner

    torch.manual_seed(0)
    build, make_input = CASES[name]
    model, x = build(), make_input()
    calibration = [image() for _ in range(3)]
    if name == "basic":
        model = Pruner().prune_model(model, amount=0.5)
    elif name.startswith("torch-pruning"):
        model = Pruner().prune_model(model, amount=0.3, prune_type="structured", example_input=x)
    elif name == "svd":
        model = Decomposer().decompose_model(model, rank_ratio=0.25)
    elif name == "fusion-conv-bn":
        model = LayerFuser().fuse_conv_bn_relu(model)
    elif name == "fusion-linear-gelu":
        model = LayerFuser().fuse_linear_gelu(model)
    elif name == "tome":
        model = ViTToMePruner().apply_patch(model, r=1)
    elif name == "tomesd":
        model = StableDiffusionPruner().apply_patch(model, ratio=0.5)
    elif name == "torchao-int8-weight-only":
        model, _ = Quantizer().quantize(model, method="int8_weight_only", example_input=x)
    elif name == "torchao-int8-dynamic":
        model, _ = Quantizer().quantize(model, method="int8_dynamic", example_input=x)
    elif name == "torchao-autoquant":
        model, _ = Quantizer().quantize(model, method="autoquant", example_input=x, tolerance=1.0)
    elif name == "nncf-int8-static":
        model, _ = Quantizer().quantize(model, method="int8_static", backend="nncf", example_input=x,
                                        calibration_data=calibration)
    elif name == "inc-int8-static":
        model, _ = Quantizer().quantize(model, method="int8_static", backend="neural-compressor", example_input=x,
                                        calibration_data=calibration)
    elif name == "nncf-prune":
        model = Pruner().prune_model(model, amount=0.5, backend="nncf", example_input=x)
    elif name == "inc-weight-only":
        model, _ = Quantizer().quantize(model, method="weight_only", backend="neural-compressor")
    return model.eval(), x
