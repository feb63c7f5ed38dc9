"""NNCF int8 through OpenVINO on the digits example: accuracy, artifacts, accuracy control, bad input."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import model_opt
import numpy as np
import pytest
import torch
from model_opt.errors import TechniqueError, UsageError
from model_opt.techniques import Quantizer
from model_opt_nncf.openvino_module import OpenVINOModule


@pytest.mark.slow
def test_digits_int8_agrees_with_float_and_reloads(cli, digits, tmp_path: Path) -> None:
    out = tmp_path / "int8.pt"
    result = cli("optimize", digits.model, "--test-dataset", digits.dataset, "--test-script", digits.script,
                 "--quantize", "--quant-backend", "nncf", "--quant-method", "int8_static", "--output", out,
                 "--json", "-q")
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    info = report["steps"][0]["info"]
    assert info["runtime"] == "OpenVINO CPU" and info["quantized_layers"] >= 3
    assert report["after"]["metrics"]["accuracy"] >= report["before"]["metrics"]["accuracy"] - 0.01
    assert report["native_files"] == [str(out.with_suffix(".xml")), str(out.with_suffix(".bin"))]
    # the float model in OpenVINO timed in the same rounds (each in its own process): the speed-up split into
    # OpenVINO's part and int8's own
    assert report["runtime_latency"]["runtime"] == "openvino"
    summary = report["summary"]
    assert summary["speedup_runtime"] is None or summary["speedup"] == pytest.approx(
        summary["speedup_runtime"] * summary["speedup_technique"])
    data = np.load(digits.dataset / "test.npz")
    x = torch.from_numpy(data["images"]).float().div(16).unsqueeze(1)
    float_model = model_opt.load(digits.whole_model, trust_model=True).eval()
    with torch.no_grad():
        reference = float_model(x).argmax(1)
    for path in (out, out.with_suffix(".xml")):
        reloaded = model_opt.load(path)
        assert isinstance(reloaded, OpenVINOModule)
        agreement = (reloaded(x).argmax(1) == reference).float().mean().item()
        assert agreement >= 0.98


@pytest.mark.slow
def test_accuracy_control_uses_the_users_metric(cli, digits, tmp_path: Path) -> None:
    result = cli("optimize", digits.model, "--test-dataset", digits.dataset, "--test-script", digits.script,
                 "--quantize", "--quant-backend", "nncf", "--quant-method", "int8_static", "--output",
                 tmp_path / "ac.pt", "--max-accuracy-drop", "0.01", "--json", "-q")
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    control = report["steps"][0]["info"]["accuracy_control"]
    assert control["max_drop"] == 0.01 and control["plain_int8_drop"] <= 0.01
    assert control["used"] == "plain int8 (within the budget)"
    assert report["metric_drop"] <= 0.01


@pytest.mark.slow
def test_accuracy_control_runs_when_plain_int8_is_over_budget(cli, digits, tmp_path: Path) -> None:
    from helpers import write_fidelity_script

    strict = write_fidelity_script(digits, tmp_path / "strict")
    result = cli("optimize", digits.model, "--test-dataset", digits.dataset, "--test-script", strict,
                 "--quantize", "--quant-backend", "nncf", "--output", tmp_path / "ac.pt", "--max-accuracy-drop",
                 "0.000001", "--json", "-q")
    report = json.loads(result.stdout)  # printed whether or not the budget was met
    control = report["steps"][0]["info"]["accuracy_control"]
    assert control["plain_int8_drop"] > 0.000001 and "controlled_drop" in control
    assert result.exit_code == (0 if min(control["plain_int8_drop"], control["controlled_drop"]) <= 0.000001 else 1)


def test_python_api_and_bad_calibration(digits) -> None:
    float_model = model_opt.load(digits.whole_model, trust_model=True).eval()
    x = torch.rand(8, 1, 8, 8)
    quantized, info = Quantizer().quantize(float_model, method="int8_static", backend="nncf", example_input=x,
                                           calibration_data=[torch.rand(16, 1, 8, 8) for _ in range(4)])
    assert isinstance(quantized, OpenVINOModule) and info["fake_quantize_ops"] > 0
    with pytest.raises(UsageError, match=r"calibration data \(16, 3, 8, 8\) does not fit the model at layer "
                                         r"features.0 \(Conv2d\)"):
        Quantizer().quantize(float_model, method="int8_static", backend="nncf", example_input=x,
                             calibration_data=[torch.rand(16, 3, 8, 8)])
    with pytest.raises(TechniqueError, match=r"nncf int8_static needs calibration data; define "
                                             r"calibration_data\(dataset_path\)"):
        Quantizer().quantize(float_model, method="int8_static", backend="nncf", example_input=x)


def test_no_calibration_function_in_the_script(cli, digits, tmp_path: Path) -> None:
    script = tmp_path / "eval.py"
    script.write_text(digits.script.read_text().replace("def calibration_data(", "def _unused_calibration("))
    shutil.copy(digits.folder / "digits_model.py", tmp_path)
    result = cli("optimize", digits.model, "--test-dataset", digits.dataset, "--test-script", script,
                 "--quantize", "--quant-backend", "nncf", "--output", tmp_path / "o.pt")
    assert result.exit_code == 1
    assert "nncf int8_static needs calibration data; define calibration_data(dataset_path) in the test script" \
        in result.stderr
    assert not (tmp_path / "o.pt").exists()


def test_conversion_failure_names_the_op_and_keeps_the_model() -> None:
    class Unsupported(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.special.bessel_j0(x)

    model = Unsupported()
    with pytest.raises(TechniqueError, match=r"OpenVINO could not convert the model \(.*bessel_j0.*\); exclude or "
                                             r"rewrite that op; the input model is untouched"):
        Quantizer().quantize(model, method="int8_static", backend="nncf", example_input=torch.rand(2, 4),
                             calibration_data=[torch.rand(2, 4)])


@pytest.mark.slow
def test_nncf_pruning_with_recovery_stays_within_a_point(cli, digits, tmp_path: Path) -> None:
    out = tmp_path / "sparse.pt"
    result = cli("optimize", digits.model, "--test-dataset", digits.dataset, "--test-script", digits.script,
                 "--prune", "--prune-backend", "nncf", "--prune-amount", "0.6", "--finetune-steps", "300",
                 "--output", out, "--json", "-q")
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    info = report["steps"][0]["info"]
    assert info["sparsity"] == pytest.approx(0.6, abs=0.02) and info["bn_adaptation_batches"] > 0
    assert report["after"]["metrics"]["accuracy"] >= report["before"]["metrics"]["accuracy"] - 0.01
    assert any("nncf unstructured does not reduce latency" in w for w in report["warnings"])
    reloaded = model_opt.load(out, test_script=digits.script)
    zeros = sum(int((p == 0).sum()) for p in reloaded.parameters() if p.dim() > 1)
    assert zeros >= 0.55 * sum(p.numel() for p in reloaded.parameters() if p.dim() > 1)


def test_nncf_pruning_of_a_plain_sequential_through_the_seed_api() -> None:
    from model_opt.techniques import Pruner

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 8)).eval()
    x = torch.randn(4, 32)
    pruner = Pruner()
    pruned = pruner.prune_model(model, amount=0.5, prune_type="unstructured", backend="nncf", example_input=x,
                                exclude=["2"])
    assert type(pruned) is torch.nn.Sequential and len(pruned) == 3  # NNCF's hook storage is gone
    assert "forward" not in pruned.__dict__
    assert (pruned[0].weight == 0).float().mean().item() == pytest.approx(0.5, abs=0.01)
    assert (pruned[2].weight == 0).sum().item() == 0  # excluded
    assert pruned(x).shape == (4, 8)
    assert pruned[0].weight.requires_grad


@pytest.mark.slow
def test_nncf_regularization_trains_masks_with_the_train_hook(cli, digits, tmp_path: Path) -> None:
    torch.manual_seed(0)  # the script's train() draws its batches from torch's global generator: whatever ran before
    result = cli("optimize", digits.model, "--test-dataset", digits.dataset, "--test-script", digits.script,
                 "--prune", "--prune-backend", "nncf", "--prune-type", "regularization", "--prune-amount", "0.6",
                 "--prune-opt", "train_steps=300", "--output", tmp_path / "rb.pt", "--json", "-q")
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["steps"][0]["info"]["sparsity"] >= 0.5
    assert report["after"]["metrics"]["accuracy"] >= report["before"]["metrics"]["accuracy"] - 0.01


def test_int8_exclude_keeps_the_named_layer_in_float_and_ignored_is_its_old_name() -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 8)).eval()
    x = torch.randn(4, 32)
    data = [torch.randn(4, 32) for _ in range(4)]
    quantizer = Quantizer()
    quantizer.quantize(model, method="int8_static", backend="nncf", example_input=x, calibration_data=data)
    assert quantizer.info["quantized_layers"] == 2
    quantizer.quantize(model, method="int8_static", backend="nncf", example_input=x, calibration_data=data,
                       exclude=["2"])
    assert quantizer.info["quantized_layers"] == 1 and quantizer.info["float_layers"]
    with pytest.warns(FutureWarning, match="option 'ignored' is now 'exclude'"):
        quantizer.quantize(model, method="int8_static", backend="nncf", example_input=x, calibration_data=data,
                           ignored=["2"])
    assert quantizer.info["quantized_layers"] == 1
    with pytest.raises(UsageError, match="nncf int8_static exclude=fc9 names no module of the model"):
        quantizer.quantize(model, method="int8_static", backend="nncf", example_input=x, calibration_data=data,
                           exclude=["fc9"])


TELEMETRY_PROBE = """
import os, sys
forks = []
os.register_at_fork(before=lambda: forks.append(1))
import torch
from model_opt.techniques import Quantizer
model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 4)).eval()
x = torch.randn(4, 8)
Quantizer().quantize(model, method="int8_static", backend="nncf", example_input=x, calibration_data=[x, x])
import time; time.sleep(1)  # (the backends' sender runs in a background thread)
print("forks", len(forks))
"""


@pytest.mark.slow
@pytest.mark.parametrize(("setting", "sends"), [("", False), ("1", True)])
def test_no_backend_telemetry_is_sent_unless_the_user_asks(tmp_path: Path, setting: str, sends: bool) -> None:
    """OpenVINO and NNCF send usage events from a background thread, each in a forked process (which Python 3.11
    kills with 'Fatal Python error: init_threadstate'): model-opt drops them, so nothing is forked, unless
    MODEL_OPT_BACKEND_TELEMETRY=1 leaves the backends' own choice."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if not k.startswith(("NNCF_", "CI"))}
    env["MODEL_OPT_BACKEND_TELEMETRY"] = setting
    proc = subprocess.run([sys.executable, "-c", TELEMETRY_PROBE], capture_output=True, text=True, timeout=600,
                          env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    forks = int(proc.stdout.split("forks")[1])
    assert (forks > 0) is sends, (forks, proc.stderr[-1000:])
    if not sends:
        assert "Fatal Python error" not in proc.stderr


def test_a_causal_lm_runs_stateful_as_its_explicit_cache_ir_computes() -> None:
    """OpenVINOCausalLM runs a stateful copy of the saved explicit-cache IR (the cache inside OpenVINO): the same
    logits for a whole sequence, and the same greedy tokens as decoding the saved IR with its past passed in and
    out; the saved IR keeps its explicit-cache ports."""
    import openvino as ov
    from model_opt_nncf.openvino_lm import OpenVINOCausalLM, convert_causal_lm, past_after
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    lm = LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=300,
                                      max_position_embeddings=64)).eval()
    prompt = torch.randint(0, 300, (1, 12))
    ir, layout = convert_causal_lm(lm, prompt)
    module = OpenVINOCausalLM(ir, compile_config={"kv": layout})
    assert "beam_idx" not in [port.get_any_name() for port in module.ov_model.inputs]  # (the IR as saved)
    explicit = ov.Core().compile_model(ir, "CPU")
    empty = [np.zeros((1, layout["heads"], 0, layout["head_dim"]), np.float32) for _ in range(2 * layout["layers"])]
    ids = prompt.numpy()
    np.testing.assert_allclose(module(prompt).logits.numpy(),
                               explicit([ids, np.ones(ids.shape, np.int64), *empty])[0], atol=1e-4)
    after, past, tokens = past_after(ir), empty, ids
    for _ in range(8):  # greedy, the past passed in and out
        logits = explicit([tokens[:, -1:] if past is not empty else tokens,
                           np.ones(tokens.shape, np.int64), *past])[0]
        past = after(tokens[:, -1:], past) if past is not empty else after(tokens, empty)
        tokens = np.concatenate([tokens, logits[:, -1:].argmax(-1)], axis=1)
    assert module.generate(prompt, max_new_tokens=8)[0].tolist() == tokens[0].tolist()
