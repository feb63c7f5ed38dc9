"""Recovery fine-tuning sits between the steps it repairs (pruning, decomposition) and the ones whose result
is not trained (fusion, quantization): prune + recovery + each quantizer works through the CLI, and train()
is handed the pruned torch model, trainable, never a quantized or OpenVINO one."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

TRAIN_CHECK = '''

_train = train


def train(model, dataset_path, steps):
    from digits_model import DigitsNet

    assert type(model) is DigitsNet, f"train() got {type(model).__name__}"
    assert all(p.requires_grad and type(p) is torch.nn.Parameter for p in model.parameters())
    return _train(model, dataset_path, steps)
'''


@pytest.fixture()
def checked_script(digits, tmp_path: Path) -> Path:
    shutil.copy(digits.folder / "digits_model.py", tmp_path)
    script = tmp_path / "eval_checked.py"
    script.write_text(digits.script.read_text() + TRAIN_CHECK)
    return script


@pytest.mark.slow
@pytest.mark.parametrize("quantizer", [
    ["--quant-backend", "nncf", "--quant-method", "int8_static"],
    ["--quant-backend", "torchao", "--quant-method", "int8_dynamic", "--compile"],
    ["--quant-backend", "neural-compressor", "--quant-method", "int8_static"],
], ids=["nncf", "torchao", "neural-compressor"])
def test_prune_recover_then_quantize(cli, digits, checked_script: Path, tmp_path: Path, quantizer: list) -> None:
    out = tmp_path / "combined.pt"
    result = cli("optimize", digits.model, "--test-dataset", digits.dataset, "--test-script", checked_script,
                 "--prune", "--prune-backend", "torch-pruning", "--prune-amount", "0.5", "--finetune-steps", "40",
                 "--quantize", *quantizer, "--output", out, "--json", "-q")
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    assert [s["kind"] for s in report["steps"]] == ["prune", "quantize"]
    assert report["recovery"]["after"] == ["prune:torch-pruning:structured"]
    assert report["after"]["metrics"]["accuracy"] >= report["before"]["metrics"]["accuracy"] - 0.1
    assert out.exists()


def test_recovery_without_a_step_it_repairs_is_refused(cli, digits, tmp_path: Path) -> None:
    result = cli("optimize", digits.model, "--test-dataset", digits.dataset, "--test-script", digits.script,
                 "--quantize", "--quant-backend", "torchao", "--quant-method", "int8_dynamic", "--finetune-steps", "10",
                 "--output", tmp_path / "o.pt")
    assert result.exit_code == 2
    assert "--finetune-steps recovers what pruning or decomposition changed" in result.stderr
    assert not (tmp_path / "o.pt").exists()


QAT_CHECK = '''

_train = train


def train(model, dataset_path, steps):
    import json, os
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad and "__nncf" not in n]
    kinds = sorted({type(m).__name__ for m in model.modules()})
    with open(os.path.join(os.path.dirname(__file__), "trained.json"), "w") as f:
        json.dump({"steps": steps, "modules": kinds, "frozen": frozen}, f)
    return _train(model, dataset_path, steps)
'''


@pytest.mark.slow
@pytest.mark.parametrize("quantizer, simulated", [
    (["--quant-backend", "nncf", "--quant-method", "int8_static"], "HookStorage"),  # NNCF's fake-quantize hooks
    (["--quant-backend", "torchao", "--quant-method", "int8_dynamic", "--quant-opt", "skip_head=false"],
     "FakeQuantizedLinear"),
], ids=["nncf", "torchao"])
def test_quantization_aware_training(cli, digits, tmp_path: Path, quantizer: list, simulated: str) -> None:
    """--qat-steps trains the int8-simulated model with the test script's train(), then quantizes; the result
    reopens with the accuracy the report gives."""
    shutil.copy(digits.folder / "digits_model.py", tmp_path)
    script = tmp_path / "eval_qat.py"
    script.write_text(digits.script.read_text() + QAT_CHECK)
    out = tmp_path / "qat.pt"
    result = cli("optimize", digits.model, "--test-dataset", digits.dataset, "--test-script", script,
                 "--quantize", *quantizer, "--qat-steps", "20", "--output", out, "--json", "-q")
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["steps"][0]["info"]["quantization_aware_training"] == {"steps": 20}
    seen = json.loads((tmp_path / "trained.json").read_text())
    assert seen["steps"] == 20 and seen["frozen"] == [], seen
    assert simulated in seen["modules"]
    after = report["after"]["metrics"]["accuracy"]
    assert after >= report["before"]["metrics"]["accuracy"] - 0.03
    import model_opt
    from model_opt.testscript import TestScript

    reopened = model_opt.load(out, test_script=script)
    assert TestScript(script).evaluate(reopened, str(digits.dataset), "cpu").value == pytest.approx(after, abs=1e-6)


def test_quantization_aware_training_needs_train(cli, digits, tmp_path: Path) -> None:
    shutil.copy(digits.folder / "digits_model.py", tmp_path)
    shutil.copy(digits.script, tmp_path / "digits_eval.py")
    script = tmp_path / "eval_no_train.py"
    script.write_text("import digits_eval as d\n\n" + "".join(
        f"def {name}(*args):\n    return d.{name}(*args)\n\n"
        for name in ("load_model", "evaluate", "example_input", "calibration_data")))
    result = cli("optimize", digits.model, "--test-dataset", digits.dataset, "--test-script", script,
                 "--quantize", "--quant-backend", "torchao", "--quant-method", "int8_weight_only", "--qat-steps", "5",
                 "--output", tmp_path / "o.pt")
    assert result.exit_code != 0
    assert ("torchao int8_weight_only trains the int8-simulated model with your train(), and the test script "
            "defines none") in result.stderr
    assert not (tmp_path / "o.pt").exists()
