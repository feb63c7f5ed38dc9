"""Intel Neural Compressor through model-opt: static int8, weight-only, autotune with the user's metric."""

from __future__ import annotations

import copy
import io
import json
from pathlib import Path

import model_opt
import numpy as np
import pytest
import torch
from helpers import write_fidelity_script
from model_opt.exported import ExportedModule
from model_opt.techniques import Quantizer
from torch import nn


def digits_tensors(digits) -> tuple[torch.Tensor, torch.Tensor]:
    data = np.load(digits.dataset / "test.npz")
    return torch.from_numpy(data["images"]).float().div(16).unsqueeze(1), torch.from_numpy(data["labels"]).long()


def test_static_int8_agrees_with_float_and_reloads(digits, tmp_path: Path) -> None:
    model = model_opt.load(digits.whole_model, trust_model=True).eval()
    x, _ = digits_tensors(digits)
    calibration = [x[i:i + 32] for i in range(0, 320, 32)]
    with torch.no_grad():
        reference = model(x).argmax(1)
    quantized, info = Quantizer().quantize(copy.deepcopy(model), method="int8_static", backend="neural-compressor",
                                           example_input=x[:8], calibration_data=calibration)
    assert isinstance(quantized, ExportedModule) and info["quantize_ops"] >= 3
    with torch.no_grad():
        out = quantized(x)
    assert (out.argmax(1) == reference).float().mean().item() >= 0.98
    model_opt.save(quantized, tmp_path / "inc.pt")
    with torch.no_grad():
        torch.testing.assert_close(model_opt.load(tmp_path / "inc.pt")(x), out)


def test_weight_only_rtn_packs_linear_weights() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 512), nn.ReLU(), nn.Linear(512, 64)).eval()
    x = torch.randn(16, 256)
    with torch.no_grad():
        expected = model(x)
    before = io.BytesIO()
    torch.save(model.state_dict(), before)
    quantized, info = Quantizer().quantize(model, method="weight_only", backend="neural-compressor",
                                           bits=4, group_size=32)
    assert info["packed_layers"] == 2
    with torch.no_grad():
        out = quantized(x)
    assert nn.functional.cosine_similarity(out.flatten(), expected.flatten(), dim=0) > 0.99
    after = io.BytesIO()
    torch.save(quantized.state_dict(), after)
    assert after.tell() < 0.4 * before.tell()


def test_static_int8_keeps_excluded_modules_in_float(digits) -> None:
    """exclude: the classifier's layers keep their float weights (the features' are int8), and fewer quantize ops
    are left in the graph."""
    model = model_opt.load(digits.whole_model, trust_model=True).eval()
    x, _ = digits_tensors(digits)
    calibration = [x[i:i + 32] for i in range(0, 128, 32)]

    def quantize(exclude: list[str]) -> tuple[nn.Module, dict]:
        return Quantizer().quantize(copy.deepcopy(model), method="int8_static", backend="neural-compressor",
                                    example_input=x[:8], calibration_data=calibration, exclude=exclude)

    def quantized_in(graph: nn.Module, prefix: str) -> int:
        """The conv/linear nodes of the modules under ``prefix`` whose weight comes dequantized from int8."""
        return sum(1 for node in graph.graph.nodes if str(node.target) in ("aten.linear.default", "aten.conv2d.default")
                   and "dequantize" in str(getattr(node.args[1], "target", "")) and any(
                       path == prefix or path.startswith(prefix + ".")
                       for path, _ in node.meta.get("nn_module_stack", {}).values()))

    whole, info = quantize([])
    kept, kept_info = quantize(["classifier"])
    assert quantized_in(whole.module_, "classifier") > 0 and quantized_in(kept.module_, "classifier") == 0
    assert quantized_in(kept.module_, "features") > 0
    assert kept_info["quantize_ops"] < info["quantize_ops"] and kept_info["kept_float"] == ["classifier"]


def test_weight_only_keeps_excluded_linears_in_float(tmp_path: Path) -> None:
    """exclude names a Linear: it stays an nn.Linear with its float weights, the others are packed; the saved
    result reopens with the same layers packed."""
    torch.manual_seed(0)

    def architecture() -> nn.Module:
        return nn.Sequential(nn.Linear(256, 512), nn.ReLU(), nn.Linear(512, 64)).eval()

    model = architecture()
    float_weight = model[2].weight.detach().clone()
    quantized, info = Quantizer().quantize(copy.deepcopy(model), method="weight_only", backend="neural-compressor",
                                           bits=4, group_size=32, exclude=["2"])
    assert info["packed_layers"] == 1 and type(quantized[2]) is nn.Linear
    torch.testing.assert_close(quantized[2].weight, float_weight)
    model_opt.save(quantized, tmp_path / "woq.pt")
    x = torch.randn(4, 256)
    reopened = model_opt.load(tmp_path / "woq.pt", model=architecture())
    assert type(reopened[2]) is nn.Linear
    with torch.no_grad():
        torch.testing.assert_close(reopened(x), quantized(x))


@pytest.mark.slow
def test_autotune_within_budget_and_refusal_when_none_fits(cli, digits, tmp_path: Path) -> None:
    base = ["optimize", digits.model, "--test-dataset", digits.dataset, "--test-script", digits.script,
            "--quantize", "--quant-backend", "neural-compressor", "--quant-method", "autotune", "-q"]
    result = cli(*base, "--max-accuracy-drop", "0.02", "--quant-opt", "reduce_range=on", "--output",
                 tmp_path / "tuned.pt", "--json")
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    assert len(report["steps"][0]["info"]["trials"]) >= 2
    assert report["metric_drop"] <= 0.02
    # every trial calibrated 7-bit activations (for CPUs without int8 dot products): so does the graph it chose
    graph = model_opt.load(tmp_path / "tuned.pt").module_
    ranges = {(n.args[3], n.args[4]) for n in graph.graph.nodes if "quantize_per_tensor" in str(n.target)
              and n.args[-1] in (torch.uint8, torch.int8) and "dequantize" not in str(n.target)}
    assert ranges and ranges <= {(0, 127), (-64, 63)}, ranges
    strict = write_fidelity_script(digits, tmp_path / "strict")
    out = tmp_path / "never.pt"
    result = cli("optimize", digits.model, "--test-dataset", digits.dataset, "--test-script", strict,
                 "--quantize", "--quant-backend", "neural-compressor", "--quant-method", "autotune",
                 "--quant-opt", "max_trials=2", "--max-accuracy-drop", "0.000001", "--output", out, "-q")
    assert result.exit_code == 1, result.stdout
    assert "autotune found no config within the allowed drop of 1e-06" in result.stderr
    assert "best tried" in result.stderr
    assert not out.exists()


def test_nothing_is_written_in_the_working_directory(tmp_path: Path) -> None:
    """INC's default workspace is ./nc_workspace/<time>/, made when RTN asks for it: it goes to a temporary folder
    instead, removed when the process ends."""
    import subprocess
    import sys

    code = ("import torch; from torch import nn; from model_opt.techniques import Quantizer\n"
            "m = nn.Sequential(nn.Linear(64, 64)).eval()\n"
            "Quantizer().quantize(m, method='weight_only', backend='neural-compressor', bits=4, group_size=32)\n"
            "from neural_compressor.common import options; print(options.workspace)\n")
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert list(tmp_path.iterdir()) == []
    assert not Path(done.stdout.strip().splitlines()[-1]).exists()
