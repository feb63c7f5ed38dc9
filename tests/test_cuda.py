"""Every technique with a CUDA path, on a GPU: outputs close to the original, reload, refusals.

Marked ``cuda`` and skipped without a GPU; ``benchmarks/cuda_check.sh`` runs them on a lent GPU.
"""

from __future__ import annotations

import copy
from pathlib import Path

import model_opt
import pytest
import torch
from torch import nn

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return nn.functional.cosine_similarity(a.flatten().float(), b.flatten().float(), dim=0).item()


def mlp(dtype: torch.dtype = torch.bfloat16) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(1024, 1024), nn.ReLU(), nn.Linear(1024, 1024), nn.ReLU(),
                         nn.Linear(1024, 16)).to("cuda", dtype).eval()


@pytest.mark.cuda
@cuda
@pytest.mark.parametrize("method", ["int8_weight_only", "int8_dynamic", "int4_weight_only"])
def test_torchao_methods_on_cuda_keep_outputs_and_reload(method: str, tmp_path: Path) -> None:
    from model_opt.techniques import Quantizer

    model, x = mlp(), torch.randn(8, 1024, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        expected = model(x)
    quantized, info = Quantizer().quantize(copy.deepcopy(model), method=method, example_input=x)
    with torch.no_grad():
        out = quantized(x)
    assert cosine(out, expected) > 0.98
    model_opt.save(quantized, tmp_path / "q.pt")
    with torch.no_grad():
        torch.testing.assert_close(model_opt.load(tmp_path / "q.pt", model=mlp(), map_location="cuda")(x), out)


@pytest.mark.cuda
@cuda
def test_float8_runs_on_new_gpus_and_is_refused_on_old_ones() -> None:
    from model_opt.errors import DeviceError
    from model_opt.techniques import Quantizer

    model, x = mlp(), torch.randn(64, 1024, device="cuda", dtype=torch.bfloat16)
    if torch.cuda.get_device_capability() < (8, 9):
        with pytest.raises(DeviceError, match="needs a GPU of compute capability 8.9 or newer"):
            Quantizer().quantize(model, method="float8_dynamic", example_input=x)
        return
    with torch.no_grad():
        expected = model(x)
    quantized, _ = Quantizer().quantize(copy.deepcopy(model), method="float8_dynamic", example_input=x)
    with torch.no_grad():
        assert cosine(quantized(x), expected) > 0.98


@pytest.mark.cuda
@cuda
def test_autoquant_measures_cuda_kernels() -> None:
    from model_opt.techniques import Quantizer

    model, x = mlp(), torch.randn(8, 1024, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        expected = model(x)
    quantized, info = Quantizer().quantize(copy.deepcopy(model), method="autoquant", example_input=x)
    tried = {method for choice in info["choices"].values() for method in choice["trials"]}
    assert "int4_weight_only" in tried
    with torch.no_grad():
        assert cosine(quantized(x), expected) > 0.98


@pytest.mark.cuda
@cuda
def test_linear_gelu_epilogue_matches_on_cuda() -> None:
    from model_opt.techniques import LayerFuser

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 1024), nn.GELU(approximate="tanh"), nn.Linear(1024, 256)).to(
        "cuda", torch.bfloat16).eval()
    x = torch.randn(32, 256, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        expected = model(x)
        fused = LayerFuser().fuse_linear_gelu(copy.deepcopy(model))
        assert type(fused[0]).__name__ == "LinearGELU"
        torch.testing.assert_close(fused(x), expected, rtol=2e-2, atol=2e-2)


@pytest.mark.cuda
@cuda
def test_structured_pruning_tome_and_svd_on_cuda() -> None:
    import timm
    from model_opt.techniques import Decomposer, Pruner
    from model_opt.techniques.pruning.pruning_vit_tome import ViTToMePruner

    torch.manual_seed(0)
    cnn = timm.create_model("resnet18", pretrained=False, num_classes=10).cuda().eval()
    x = torch.randn(2, 3, 64, 64, device="cuda")
    before = sum(p.numel() for p in cnn.parameters())
    pruned = Pruner().prune_model(cnn, amount=0.3, prune_type="structured", example_input=x)
    assert sum(p.numel() for p in pruned.parameters()) < 0.7 * before
    assert pruned(x).shape == (2, 10)

    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=64).cuda().eval()
    image = torch.randn(2, 3, 64, 64, device="cuda")
    with torch.no_grad():
        expected = vit(image)
        torch.testing.assert_close(ViTToMePruner().apply_patch(copy.deepcopy(vit), r=0)(image), expected)
        assert ViTToMePruner().apply_patch(copy.deepcopy(vit), r=2)(image).shape == expected.shape

    layer = nn.Sequential(nn.Linear(64, 64)).cuda().eval()
    h = torch.randn(4, 64, device="cuda")
    full = Decomposer().decompose_model(copy.deepcopy(layer), rank_ratio=1.0, min_features=1)
    with torch.no_grad():
        # rank 1.0 would not save parameters, so nothing changes; rank 0.25 still computes close outputs
        torch.testing.assert_close(full(h), layer(h))


@pytest.mark.cuda
@cuda
def test_tomesd_on_cuda() -> None:
    from diffusers import UNet2DConditionModel
    from model_opt.techniques.pruning.pruning_sd import StableDiffusionPruner

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=32, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=8, norm_num_groups=8).cuda().eval()
    latents = torch.randn(2, 4, 32, 32, device="cuda")
    text = torch.randn(2, 7, 32, device="cuda")
    with torch.no_grad():
        expected = unet(latents, 10, encoder_hidden_states=text).sample
        patched = StableDiffusionPruner().apply_patch(copy.deepcopy(unet), ratio=0.3, use_rand=False)
        assert cosine(patched(latents, 10, encoder_hidden_states=text).sample, expected) > 0.9


@pytest.mark.cuda
@cuda
def test_optimize_with_compile_on_cuda(cli, digits, tmp_path: Path) -> None:
    import json

    result = cli("optimize", digits.model, "--test-dataset", digits.dataset, "--test-script", digits.script,
                 "--prune", "--prune-backend", "torch-pruning", "--prune-amount", "0.3", "--device", "cuda",
                 "--compile", "--output", tmp_path / "c.pt", "--json", "-q")
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["device"] == "cuda" and report["after"]["latency"]["runtime"] == "compiled"


@pytest.mark.slow
def test_cuda_check_dry_run_lists_what_would_run() -> None:
    """Runs everywhere (not CUDA-marked): the one-command check lists its tests and benchmark rows."""
    import os
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run(["bash", str(root / "benchmarks" / "cuda_check.sh"), "--dry-run"], capture_output=True,
                          text=True, env={**os.environ, "PYTHON": sys.executable}, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "tests/test_cuda.py::test_float8_runs_on_new_gpus_and_is_refused_on_old_ones" in proc.stdout
    assert "plugins/torchao/tests/test_torchao.py::test_int4_weight_only_on_cuda" in proc.stdout
    assert "benchmarks/gpu.py decode:" in proc.stdout
