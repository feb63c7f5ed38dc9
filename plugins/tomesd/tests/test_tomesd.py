"""ToMeSD on a small diffusers UNet built from a config dict (no downloads)."""

from __future__ import annotations

import pytest
import torch
from diffusers import DDIMScheduler, DiffusionPipeline, DiTTransformer2DModel, UNet2DConditionModel
from model_opt.errors import TechniqueError, UsageError
from model_opt.techniques.pruning.pruning_sd import StableDiffusionPruner

CONFIG = {
    "sample_size": 32, "in_channels": 4, "out_channels": 4, "layers_per_block": 1,
    "block_out_channels": (32, 64), "down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D"), "cross_attention_dim": 32,
    "attention_head_dim": 8, "norm_num_groups": 8,
}


class TinyPipeline(DiffusionPipeline):
    def __init__(self, unet: UNet2DConditionModel, scheduler: DDIMScheduler) -> None:
        super().__init__()
        self.register_modules(unet=unet, scheduler=scheduler)


def unet() -> UNet2DConditionModel:
    torch.manual_seed(0)
    return UNet2DConditionModel(**CONFIG).eval()


def run(model: UNet2DConditionModel) -> torch.Tensor:
    generator = torch.Generator().manual_seed(1)
    latents = torch.randn(2, 4, 32, 32, generator=generator)
    text = torch.randn(2, 7, 32, generator=generator)
    with torch.no_grad():
        return model(latents, 10, encoder_hidden_states=text).sample


def test_small_ratio_stays_close_and_removal_restores_exactly() -> None:
    model = unet()
    expected = run(model)
    pruner = StableDiffusionPruner()
    patched = pruner.apply_patch(model, ratio=0.3, use_rand=False)
    assert pruner.info["patched_blocks"] == 4  # down 1, mid 1, up 2 BasicTransformerBlocks
    out = run(patched)
    assert not torch.equal(out, expected)
    cosine = torch.nn.functional.cosine_similarity(out.flatten(), expected.flatten(), dim=0)
    assert cosine > 0.95
    restored = pruner.remove_patch(patched)
    assert torch.equal(run(restored), expected)


def test_patched_unet_saves_and_reloads_patched(tmp_path) -> None:
    import model_opt

    model = unet()
    patched = StableDiffusionPruner().apply_patch(model, ratio=0.4, use_rand=False)
    expected = run(patched)
    model_opt.save(patched, tmp_path / "tomesd.pt")
    reloaded = model_opt.load(tmp_path / "tomesd.pt", model=unet())
    assert hasattr(reloaded.unet, "_tome_info")
    assert torch.equal(run(reloaded), expected)
    assert torch.equal(run(patched), expected)  # saving did not unpatch the live model


def test_pipeline_is_accepted_and_patches_its_unet() -> None:
    pipe = TinyPipeline(unet(), DDIMScheduler())
    expected = run(pipe.unet)
    pruner = StableDiffusionPruner()
    pruner.apply_patch(pipe, ratio=0.5, max_downsample=2)
    assert hasattr(pipe.unet, "_tome_info")
    assert run(pipe.unet).shape == expected.shape
    pruner.remove_patch(pipe)
    assert torch.equal(run(pipe.unet), expected)


def test_refusals() -> None:
    dit = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, num_layers=1,
                                sample_size=8, patch_size=2)
    with pytest.raises(TechniqueError, match="DiTTransformer2DModel is not one .DiT/PixArt transformers are not "
                                             "supported"):
        StableDiffusionPruner().apply_patch(dit, ratio=0.5)
    with pytest.raises(UsageError, match=r"option 'ratio' is 1, outside \[0, 1\)"):
        StableDiffusionPruner().apply_patch(unet(), ratio=1.0)
    with pytest.raises(UsageError, match=r"outside \[0, 1\)"):
        StableDiffusionPruner().apply_patch(unet(), ratio=-0.1)
    with pytest.raises(UsageError, match="ratio 0.6 is above 0.50, the most that sx=2, sy=1 can merge"):
        StableDiffusionPruner().apply_patch(unet(), ratio=0.6, sy=1)
