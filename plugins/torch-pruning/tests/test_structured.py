"""Structured pruning with torch-pruning: timm CNNs and ViTs, reloading, recovery, bad input."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import model_opt
import pytest
import timm
import torch
from model_opt.errors import TechniqueError, UsageError
from model_opt.techniques import Pruner


def params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


CNNS = ["resnet18", "mobilenetv3_small_100", "efficientnet_b0", "convnext_atto"]


@pytest.mark.parametrize("name", CNNS)
def test_timm_cnns_lose_channels_and_still_run(name: str) -> None:
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, num_classes=10).eval()
    x = torch.randn(2, 3, 64, 64)
    before = params(model)
    pruner = Pruner()
    pruned = pruner.prune_model(model, amount=0.3, criterion="magnitude", prune_type="structured", example_input=x)
    with torch.no_grad():
        assert pruned(x).shape == (2, 10)
    assert params(pruned) < 0.75 * before
    assert pruner.info["params_ratio"] == pytest.approx(params(pruned) / before, abs=1e-3)
    head = pruner.info["ignored_layers"][0]
    assert pruned.get_submodule(head).out_features == 10


@pytest.mark.parametrize("name", ["vit_tiny_patch16_224", "deit_tiny_distilled_patch16_224"])
def test_vits_lose_heads_and_mlp_width_and_forward_runs(name: str) -> None:
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, img_size=64, num_classes=10).eval()
    x = torch.randn(2, 3, 64, 64)
    heads_before = model.blocks[0].attn.num_heads
    pruner = Pruner()
    pruned = pruner.prune_model(model, amount=0.5, prune_type="structured", example_input=x)
    attn = pruned.blocks[0].attn
    assert attn.num_heads < heads_before
    assert attn.qkv.out_features == 3 * attn.num_heads * attn.head_dim
    assert pruned.blocks[0].mlp.fc1.out_features < 4 * 192
    with torch.no_grad():
        assert pruned(x).shape == (2, 10)
    assert set(pruner.info["ignored_layers"]) >= {"head"}
    assert pruner.info["params_ratio"] < 0.4


def test_channel_ratio_half_removes_about_three_quarters_of_resnet18() -> None:
    model = timm.create_model("resnet18", pretrained=False).eval()
    pruner = Pruner()
    pruner.prune_model(model, amount=0.5, prune_type="structured", example_input=torch.randn(1, 3, 64, 64))
    assert 0.2 < pruner.info["params_ratio"] < 0.3
    assert "left 26% of the parameters" in pruner.info["note"]


def test_user_excluded_layers_keep_their_width() -> None:
    model = timm.create_model("resnet18", pretrained=False).eval()
    pruned = Pruner().prune_model(model, amount=0.5, prune_type="structured", example_input=torch.randn(1, 3, 64, 64),
                                  exclude=["layer1.0.conv1"])
    assert pruned.layer1[0].conv1.out_channels == 64
    assert pruned.layer2[0].conv1.out_channels < 128


def test_the_former_name_ignored_layers_still_works_with_a_note() -> None:
    model = timm.create_model("resnet18", pretrained=False).eval()
    with pytest.warns(FutureWarning, match="option 'ignored_layers' is now 'exclude'"):
        pruned = Pruner().prune_model(model, amount=0.5, prune_type="structured",
                                      example_input=torch.randn(1, 3, 64, 64), ignored_layers=["layer1.0.conv1"])
    assert pruned.layer1[0].conv1.out_channels == 64


@pytest.mark.slow
@pytest.mark.parametrize("name", ["resnet18", "vit_tiny_patch16_224"])
def test_pruned_model_reloads_in_a_fresh_process_and_as_export(name: str, tmp_path: Path) -> None:
    from model_opt.pipeline import export_beside

    torch.manual_seed(0)
    kwargs = {"img_size": 64} if name.startswith("vit") else {}
    model = timm.create_model(name, pretrained=False, num_classes=10, **kwargs).eval()
    x = torch.randn(2, 3, 64, 64)
    pruned = Pruner().prune_model(model, amount=0.4, prune_type="structured", example_input=x)
    with torch.no_grad():
        expected = pruned(x)
    model_opt.save(pruned, tmp_path / "pruned.pt")
    warnings: list[str] = []
    assert export_beside(pruned, x, tmp_path / "pruned.pt2", warnings) and not warnings
    torch.save({"x": x, "expected": expected}, tmp_path / "io.pt")
    code = f"""
import sys, timm, torch, model_opt
io = torch.load(sys.argv[1])
base = timm.create_model({name!r}, pretrained=False, num_classes=10, **{kwargs!r})
for path in sys.argv[2:]:
    with torch.no_grad():
        model = model_opt.load(path, model=base) if path.endswith(".pt") else model_opt.load(path)
        torch.testing.assert_close(model(io["x"]), io["expected"], rtol=1e-5, atol=1e-5)
print("same")
"""
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path / "io.pt"), str(tmp_path / "pruned.pt"),
                           str(tmp_path / "pruned.pt2")], capture_output=True, text=True, cwd=tmp_path)
    assert proc.stdout.strip() == "same", proc.stderr


@pytest.mark.slow
def test_recovery_brings_digits_back_within_one_point(cli, digits, tmp_path: Path) -> None:
    result = cli("optimize", digits.model, "--test-dataset", digits.dataset, "--test-script", digits.script,
                 "--prune", "--prune-backend", "torch-pruning", "--prune-amount", "0.3", "--prune-criterion",
                 "magnitude", "--finetune-steps", "300", "--output", tmp_path / "p.pt", "--json", "-q")
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    before = report["before"]["metrics"]["accuracy"]
    assert report["after"]["metrics"]["accuracy"] >= before - 0.01
    assert "accuracy" in report["recovery"]["metrics_before_recovery"]
    assert report["after"]["parameters"] < 0.6 * report["before"]["parameters"]


def test_taylor_uses_labelled_calibration_data(cli, digits, tmp_path: Path) -> None:
    result = cli("optimize", digits.model, "--test-dataset", digits.dataset, "--test-script", digits.script,
                 "--prune", "--prune-backend", "torch-pruning", "--prune-amount", "0.3", "--prune-criterion",
                 "taylor", "--output", tmp_path / "t.pt", "--json", "-q")
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["steps"][0]["options"]["criterion"] == "taylor"


def test_bad_input() -> None:
    model = timm.create_model("resnet18", pretrained=False, num_classes=10).eval()
    x = torch.randn(1, 3, 64, 64)
    with pytest.raises(TechniqueError, match="needs an example input to trace the model"):
        Pruner().prune_model(model, amount=0.3, prune_type="structured")
    with pytest.raises(UsageError,
                       match=r"the example input \(1, 5, 64, 64\) does not fit the model at layer conv1 \(Conv2d\)"):
        Pruner().prune_model(model, amount=0.3, prune_type="structured", example_input=torch.randn(1, 5, 64, 64))
    with pytest.raises(TechniqueError, match="taylor criterion needs a loss, and no labelled data was given; define "
                                             "labelled_data"):
        Pruner().prune_model(model, amount=0.3, criterion="taylor", prune_type="structured", example_input=x)
    with pytest.raises(UsageError, match=r"outside \(0, 1\)"):
        Pruner().prune_model(model, amount=1.0, prune_type="structured", example_input=x)
    with pytest.raises(UsageError, match="torch-pruning structured exclude=layer9 names no module of the model"):
        Pruner().prune_model(model, amount=0.3, prune_type="structured", example_input=x, exclude=["layer9"])
