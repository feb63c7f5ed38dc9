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
