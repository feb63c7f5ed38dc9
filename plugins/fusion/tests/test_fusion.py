"""Conv-BN(-ReLU) folding and Linear-GELU fusion: exact outputs, the ResNet trap, bad input."""

from __future__ import annotations

from pathlib import Path

import model_opt
import pytest
import timm
import torch
import torchvision
from model_opt.errors import TechniqueError
from model_opt.techniques import LayerFuser
from torch import nn


def randomize_bn(model: nn.Module) -> nn.Module:
    """Random running statistics, so that folding has something to get wrong."""
    torch.manual_seed(0)
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
            module.weight.data.uniform_(0.5, 1.5)
            module.bias.data.uniform_(-0.2, 0.2)
    return model.eval()


def rel_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def fuse_exactly(model: nn.Module, x: torch.Tensor, method: str = "fuse_conv_bn_relu") -> tuple[nn.Module, LayerFuser]:
    """Fuse with ``method`` and assert the outputs stay within 1e-5 relative of the original."""
    with torch.no_grad():
        expected = model(x)
    fuser = LayerFuser()
    fused = getattr(fuser, method)(model)
    with torch.no_grad():
        assert rel_error(fused(x), expected) < 1e-5
    return fused, fuser


MODELS = {
    "torchvision_resnet18": lambda: torchvision.models.resnet18(),
    "timm_resnet18": lambda: timm.create_model("resnet18", pretrained=False),
    "timm_mobilenetv3": lambda: timm.create_model("mobilenetv3_small_100", pretrained=False),
    "timm_efficientnet_b0": lambda: timm.create_model("efficientnet_b0", pretrained=False),
    "torchvision_mobilenet_v2": lambda: torchvision.models.mobilenet_v2(),
}


@pytest.mark.parametrize("name", MODELS)
def test_conv_bn_folding_keeps_outputs(name: str) -> None:
    model = randomize_bn(MODELS[name]())
    fused, fuser = fuse_exactly(model, torch.randn(2, 3, 64, 64))
    assert fuser.info["folded_batchnorms"] >= 20
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in fused.modules())


def test_resnet_shared_relu_is_kept_apart_where_naive_fusion_is_wrong() -> None:
    model = randomize_bn(torchvision.models.resnet18())
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = model(x)
    naive = randomize_bn(torchvision.models.resnet18())
    torch.ao.quantization.fuse_modules(naive.layer1[0], [["conv1", "bn1", "relu"]], inplace=True)
    with torch.no_grad():
        assert rel_error(naive(x), expected) > 1e-2  # the ReLU after the residual add is gone
    fuser = LayerFuser()
    with torch.no_grad():
        assert rel_error(fuser.fuse_conv_bn_relu(model)(x), expected) < 1e-5
    assert "layer1.0.relu: ReLU shared with another path (e.g. after a residual add), kept apart" \
        in fuser.info["skipped"]
    assert isinstance(model.conv1, torch.ao.nn.intrinsic.ConvReLU2d)  # the stem's ReLU is not shared


def test_grouped_depthwise_1d_3d_and_linear_bn1d() -> None:
    model = randomize_bn(nn.Sequential(
        nn.Conv2d(8, 16, 3, groups=4, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 16, 3, groups=16), nn.BatchNorm2d(16), nn.Flatten(),
        nn.Linear(16 * 4 * 4, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, 4),
    ))
    conv1d = randomize_bn(nn.Sequential(nn.Conv1d(3, 6, 3), nn.BatchNorm1d(6)))
    conv3d = randomize_bn(nn.Sequential(nn.Conv3d(2, 4, 3), nn.BatchNorm3d(4), nn.ReLU()))
    for net, x in ((model, torch.randn(3, 8, 8, 8)), (conv1d, torch.randn(2, 3, 10)),
                   (conv3d, torch.randn(1, 2, 6, 6, 6))):
        _, fuser = fuse_exactly(net, x)
    assert fuser.info["folded_batchnorms"] == 1 and fuser.info["fused_activations"] == 1


def test_linear_gelu_on_a_vit_mlp_keeps_outputs() -> None:
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=64, patch_size=16).eval()
    fused, fuser = fuse_exactly(model, torch.randn(2, 3, 64, 64), "fuse_linear_gelu")
    assert fuser.info["fused"] == 12
    assert type(fused.blocks[0].mlp.fc1).__name__ == "LinearGELU"


def test_fuse_model_runs_both_and_the_result_reloads(tmp_path: Path) -> None:
    model = randomize_bn(timm.create_model("resnet18", pretrained=False))
    x = torch.randn(1, 3, 64, 64)
    fuser = LayerFuser()
    fused = fuser.fuse_model(model, fusion_types=["conv_bn_relu", "linear_gelu"])
    assert fuser.info["conv_bn_relu"]["changed"] and not fuser.info["linear_gelu"]["changed"]
    model_opt.save(fused, tmp_path / "fused.pt")
    with torch.no_grad():
        reloaded = model_opt.load(tmp_path / "fused.pt", model=timm.create_model("resnet18", pretrained=False))
        torch.testing.assert_close(reloaded(x), fused(x), rtol=0, atol=0)


def test_training_mode_is_refused() -> None:
    with pytest.raises(TechniqueError, match="training mode, and folding layers is valid only for inference; "
                                             "call model.eval"):
        LayerFuser().fuse_conv_bn_relu(nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2)).train())


def test_unknown_fusion_type_lists_them() -> None:
    from model_opt.errors import UsageError

    with pytest.raises(UsageError, match=r"unknown fuse method 'conv_bn' .*choose one of: .*conv_bn_relu, "
                                         r".*linear_gelu"):
        LayerFuser().fuse_model(nn.Linear(2, 2).eval(), fusion_types=["conv_bn"])


def test_cli_fuses_the_digits_example_and_refuses_nothing_to_fuse(cli, digits, tmp_path: Path) -> None:
    import json

    base = ["optimize", digits.model, "--test-dataset", digits.dataset, "--test-script", digits.script, "-q"]
    result = cli(*base, "--fuse", "--fuse-types", "conv_bn_relu", "--output", tmp_path / "f.pt", "--json")
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["steps"][0]["info"]["folded_batchnorms"] == 2
    assert report["after"]["metrics"]["accuracy"] == pytest.approx(report["before"]["metrics"]["accuracy"])
    assert report["after"]["parameters"] < report["before"]["parameters"]
    result = cli(*base, "--fuse", "--fuse-types", "linear_gelu", "--output", tmp_path / "g.pt")
    assert result.exit_code == 1
    assert "nothing was optimized (fusion linear_gelu: nothing to fuse: no GELU directly follows a Linear)" \
        in result.stderr
    assert not (tmp_path / "g.pt").exists()


def test_untraceable_regions_fall_back_to_module_order_with_a_warning() -> None:
    class Untraceable(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 3)
            self.bn = nn.BatchNorm2d(8)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if x.sum() > 0:  # data-dependent control flow: torch.fx cannot trace this module
                x = x * 2
            return self.bn(self.conv(x))

    model = randomize_bn(nn.Sequential(Untraceable(), nn.ReLU()))
    _, fuser = fuse_exactly(model, torch.randn(2, 3, 10, 10))
    assert fuser.info["folded_by_module_order"][0].startswith("0.conv -> 0.bn (could not trace 0:")
    assert "paired by module order" in fuser.info["warning"]
