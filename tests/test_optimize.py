"""`model-opt optimize` end to end on the digits example, both test-script contracts, and bad input."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import model_opt
import numpy as np
import pytest
import torch
from helpers import file_hash, plugin_module

PRUNE = ["--prune", "--prune-backend", "basic", "--prune-amount", "0.5", "--prune-criterion", "l1"]


def args(example, *extra: str, script: Path | None = None, model: Path | None = None) -> list[str]:
    return ["optimize", str(model or example.model), "--test-dataset", str(example.dataset),
            "--test-script", str(script or example.script), *extra]


def test_in_process_contract_end_to_end(cli, digits, tmp_path: Path) -> None:
    out = tmp_path / "out" / "pruned.pt"
    before = file_hash(digits.model)
    result = cli(*args(digits, *PRUNE, "--output", str(out), "-q"))
    assert result.exit_code == 0, result.stderr
    table = result.stdout
    for label in ("accuracy (primary)", "latency median ms (eager)", "latency p90 ms", "parameters",
                  "non-zero parameters", "size on disk", "FLOPs", "does not reduce latency on cpu"):
        assert label in table
    report = json.loads((out.parent / "pruned.report.json").read_text())
    assert report["before"]["metrics"]["accuracy"] > 0.9
    assert report["after"]["nonzero_parameters"] < 0.6 * report["before"]["nonzero_parameters"]
    assert report["steps"][0]["info"]["sparsity"] == pytest.approx(0.5, abs=0.01)
    assert report["before"]["latency"]["median_ms"] > 0 and report["before"]["latency"]["p90_ms"] > 0
    assert report["before"]["flops"] > 0
    assert file_hash(digits.model) == before
    # The saved model reloads (rebuilt by the test script's load_model) and reproduces the reported metric.
    model = model_opt.load(out, test_script=digits.script)
    data = np.load(digits.dataset / "test.npz")
    x = torch.from_numpy(data["images"]).float().div(16).unsqueeze(1)
    accuracy = (model(x).argmax(1) == torch.from_numpy(data["labels"]).long()).float().mean().item()
    assert accuracy == pytest.approx(report["after"]["metrics"]["accuracy"])


@pytest.mark.slow
def test_program_contract_with_trusted_whole_model(cli, digits, tmp_path: Path) -> None:
    out = tmp_path / "p.pt"
    result = cli(*args(digits, *PRUNE, "--output", str(out), "--trust-model", "--input-shape", "8,1,8,8", "--json",
                       "-q", script=digits.program_script, model=digits.whole_model))
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["before"]["primary_metric"] == "accuracy"
    assert report["before"]["metrics"]["accuracy"] > 0.9
    assert report["after"]["latency"]["runs"] >= 5
    assert out.exists()


def test_the_seeds_program_mode_line_without_an_example_reports_latency_not_measured(cli, digits,
                                                                                      tmp_path: Path) -> None:
    """The seed's first example: a program-mode script (it prints its metrics), no example input, no
    --input-shape. Latency cannot be timed; the run still succeeds and the report says why."""
    out = tmp_path / "p.pt"
    result = cli(*args(digits, *PRUNE, "--output", str(out), "--trust-model", "-q", script=digits.program_script,
                       model=digits.whole_model))
    assert result.exit_code == 0, result.stderr
    assert "latency" in result.stdout and "not measured: a program-mode test script gives no example input" \
        in result.stdout
    report = json.loads((tmp_path / "p.report.json").read_text())
    assert report["before"]["latency"] is None and report["after"]["latency"] is None
    assert report["latency_note"].startswith("not measured") and "--input-shape" in report["latency_note"]
    assert report["after"]["metrics"]["accuracy"] > 0.8 and out.exists()


def test_default_output_is_beside_the_input(cli, digits, tmp_path: Path) -> None:
    folder = tmp_path / "copy"
    shutil.copytree(digits.folder, folder)
    result = cli("optimize", folder / "model.pth", "--test-dataset", folder / "data", "--test-script",
                 folder / "eval.py", *PRUNE, "-q")
    assert result.exit_code == 0, result.stderr
    assert (folder / "model.optimized.pt").exists() and (folder / "model.optimized.report.json").exists()


def test_max_accuracy_drop_fails_and_writes_nothing(cli, digits, tmp_path: Path) -> None:
    out = tmp_path / "never.pt"
    result = cli(*args(digits, "--prune", "--prune-amount", "0.95", "--output", str(out),
                       "--max-accuracy-drop", "0.0001", "-q"))
    assert result.exit_code == 1
    # (no mix of pruned and unpruned layer groups meets it either: see tests/test_sensitivity.py)
    assert "--max-accuracy-drop 0.0001" in result.stderr and "nothing was written" in result.stderr
    assert "accuracy (primary)" in result.stdout
    assert not out.exists() and not (tmp_path / "never.report.json").exists()
    assert os.listdir(tmp_path) == []


BAD = [
    (["--prune", "--prune-amount", "1.5"], r"option 'amount' is 1.5, outside \(0, 1\)"),
    (["--prune", "--prune-amount", "0"], r"outside \(0, 1\)"),
    (["--prune", "--prune-backend", "bsic"], r"unknown prune backend 'bsic' \(did you mean 'basic'\?\)"),
    (["--prune", "--prune-criterion", "l3"], r"value 'l3' \(did you mean 'l1'\?\); choose one of: l1, magnitude"),
    (["--prune", "--prune-opt", "amout=0.1"], r"'amout' \(did you mean 'amount'\?\)"),
    (["--prune", "--prune-type", "unstructred"], r"did you mean 'unstructured'"),
    (["--quantize", "--quant-method", "int8_dynamc"], r"unknown quantize method|not installed"),
    (["--prune", "--device", "tpu"], r"unknown device 'tpu'; choose one of: cpu, cuda"),
    ([], r"no technique was asked for; add --prune"),
    (["--prune", "--max-accuracy-drop", "-1"], r"negative"),
    (["--prune", "--input-shape", "a,b"], r"--input-shape 'a,b' is not a list of integers"),
]


@pytest.mark.parametrize(("extra", "message"), BAD)
def test_bad_options_exit_nonzero_with_one_line_and_write_nothing(cli, digits, tmp_path: Path, extra, message):
    import re

    out = tmp_path / "out.pt"
    result = cli(*args(digits, *extra, "--output", str(out), "-q"))
    assert result.exit_code != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.stderr
    assert re.search(message, lines[0]), lines[0]
    assert not out.exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU error")
def test_cuda_without_gpu(cli, digits, tmp_path: Path) -> None:
    result = cli(*args(digits, *PRUNE, "--device", "cuda", "--output", str(tmp_path / "o.pt")))
    assert result.exit_code == 1
    assert "Error: --device cuda was asked for, but no CUDA GPU is available here; use --device cpu" in result.stderr


def test_output_that_would_overwrite_the_input(cli, digits) -> None:
    before = file_hash(digits.model)
    result = cli(*args(digits, *PRUNE, "--output", str(digits.model)))
    assert result.exit_code == 2
    assert f"--output {digits.model} would overwrite model.pth with the output; choose another --output path" \
        in result.stderr
    assert file_hash(digits.model) == before


def test_bad_files(cli, digits, tmp_path: Path) -> None:
    (tmp_path / "junk.pth").write_text("not a model")
    cases = [
        (args(digits, *PRUNE, model=tmp_path / "missing.pth"), "model file not found"),
        (args(digits, *PRUNE, model=tmp_path, script=digits.program_script), "is a folder, not a model file"),
        (args(digits, *PRUNE, model=tmp_path / "junk.pth", script=digits.program_script),
         "junk.pth is not a PyTorch model file"),
        (args(digits, *PRUNE, model=digits.whole_model, script=digits.program_script),
         "is a pickled nn.Module, which runs code when loaded; pass --trust-model"),
        (args(digits, *PRUNE, model=digits.model, script=digits.program_script),
         "holds weights only (a state_dict), not the architecture; define load_model(path)"),
        (args(digits, *PRUNE, script=tmp_path / "nope.py"), "test script not found"),
        (["optimize", str(digits.model), "--test-dataset", str(tmp_path / "nodata"), "--test-script",
          str(digits.script), *PRUNE], "test dataset not found"),
    ]
    for argv, message in cases:
        result = cli(*argv, "--output", str(tmp_path / "o.pt"), "-q")
        assert result.exit_code != 0, argv
        assert message in result.stderr, (message, result.stderr)
        assert len(result.stderr.strip().splitlines()) == 1
        assert not (tmp_path / "o.pt").exists()


def write_script(folder: Path, name: str, body: str) -> Path:
    path = folder / name
    path.write_text(body)
    return path


def test_failing_test_scripts_show_their_own_error(cli, digits, tmp_path: Path) -> None:
    silent = write_script(tmp_path, "silent.py", "print('hello')\n")
    crash = write_script(tmp_path, "crash.py", "import sys\nsys.exit('eval crashed: no labels')\n")
    raising = write_script(tmp_path, "raising.py", (digits.script.read_text()
                                                     + "\ndef evaluate(model, dataset_path):\n"
                                                       "    raise ValueError('labels missing')\n"))
    text = write_script(tmp_path, "text.py", (digits.script.read_text()
                                              + "\ndef evaluate(model, dataset_path):\n    return 'great'\n"))
    shutil.copy(digits.folder / "digits_model.py", tmp_path)
    cases = [
        (silent, "silent.py defines no evaluate(model, dataset_path) and printed no metric"),
        (crash, "crash.py exited with code 1: eval crashed: no labels"),
        (raising, "raising.py evaluate() raised ValueError: labels missing (line"),
        (text, "text.py evaluate() returned str 'great' for 'metric', not a number"),
    ]
    for script, message in cases:
        trust = ["--trust-model", "--input-shape", "1,1,8,8"] if script in (silent, crash) else []
        model = digits.whole_model if trust else digits.model
        result = cli(*args(digits, *PRUNE, *trust, "--output", str(tmp_path / "o.pt"), "-q",
                           script=script, model=model))
        assert result.exit_code == 1
        assert message in result.stderr, result.stderr
        assert not (tmp_path / "o.pt").exists()


def test_interrupt_during_a_technique_leaves_no_output(digits, tmp_path: Path) -> None:
    """Ctrl-C (KeyboardInterrupt) mid-run: no output file, no temporary file, input untouched."""
    from model_opt.hookspecs import hookimpl
    from model_opt.pipeline import optimize
    from model_opt.plugins import PluginManager
    from model_opt.registry import Technique
    from model_opt.steps import Step

    @hookimpl
    def register_techniques(register):
        register(Technique("quantize", "interrupting", "stop", "raises KeyboardInterrupt"))

    @hookimpl
    def quantize(model, technique, options, context):
        raise KeyboardInterrupt

    manager = PluginManager(load_entry_points=False)
    plugin = plugin_module("interrupting", register_techniques=register_techniques, quantize=quantize)
    manager.register(plugin, "interrupting")
    before = file_hash(digits.model)
    with pytest.raises(KeyboardInterrupt):
        optimize(digits.model, test_script=digits.script, dataset=digits.dataset, output=tmp_path / "o.pt",
                 steps=[Step("prune", "basic"), Step("quantize", "interrupting")], manager=manager)
    assert os.listdir(tmp_path) == []
    assert file_hash(digits.model) == before


def test_finetune_needs_a_train_hook_and_export_writes_a_safe_program(cli, digits, tmp_path: Path) -> None:
    no_train = tmp_path / "eval_no_train.py"
    no_train.write_text(digits.script.read_text().split("def train(")[0])
    shutil.copy(digits.folder / "digits_model.py", tmp_path)
    result = cli(*args(digits, *PRUNE, "--finetune-steps", "10", "--output", str(tmp_path / "o.pt"),
                       script=no_train))
    assert result.exit_code == 2
    assert "--finetune-steps needs a training hook, and eval_no_train.py defines no train(" in result.stderr
    out = tmp_path / "e.pt"
    result = cli(*args(digits, *PRUNE, "--finetune-steps", "20", "--export", "--output", str(out), "--json", "-q"))
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["exported"] == str(out.with_suffix(".pt2"))
    assert report["recovery"]["steps"] == 20
    x = torch.rand(3, 1, 8, 8)
    torch.testing.assert_close(model_opt.load(out.with_suffix(".pt2"))(x),
                               model_opt.load(out, test_script=digits.script)(x))


def test_recovery_keeps_unstructured_sparsity(cli, digits, tmp_path: Path) -> None:
    out = tmp_path / "r.pt"
    result = cli(*args(digits, *PRUNE, "--finetune-steps", "30", "--output", str(out), "--json", "-q"))
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["after"]["nonzero_parameters"] <= 0.55 * report["before"]["nonzero_parameters"]
    model = model_opt.load(out, test_script=digits.script)
    assert (model.classifier[1].weight == 0).float().mean().item() == pytest.approx(0.5, abs=0.01)


def test_a_backend_crash_is_one_line_and_writes_nothing(digits, tmp_path: Path, monkeypatch) -> None:
    from helpers import plugin_module
    from model_opt.errors import TechniqueError
    from model_opt.hookspecs import hookimpl
    from model_opt.pipeline import optimize
    from model_opt.plugins import PluginManager
    from model_opt.registry import Technique
    from model_opt.steps import Step

    @hookimpl
    def register_techniques(register):
        register(Technique("quantize", "crashing", "boom", "raises a backend error"))

    @hookimpl
    def quantize(model, technique, options, context):
        raise RuntimeError("kernel not found for this dtype\nmore detail")

    manager = PluginManager(load_entry_points=False)
    manager.register(plugin_module("crashing", register_techniques=register_techniques, quantize=quantize), "crashing")
    monkeypatch.delenv("MODEL_OPT_DEBUG", raising=False)
    with pytest.raises(TechniqueError) as err:
        optimize(digits.model, test_script=digits.script, dataset=digits.dataset, output=tmp_path / "o.pt",
                 steps=[Step("quantize", "crashing")], manager=manager)
    assert str(err.value) == ("crashing boom failed on this model (RuntimeError: kernel not found for this dtype); "
                              "the input is untouched; set MODEL_OPT_DEBUG=1 to see the traceback")
    assert os.listdir(tmp_path) == []


@pytest.mark.slow
def test_backend_chatter_goes_to_a_log_beside_the_output(cli, digits, tmp_path: Path) -> None:
    out = tmp_path / "q.pt"
    quant = ["--quantize", "--quant-backend", "nncf", "--quant-method", "int8_static", "--output", str(out)]
    result = cli(*args(digits, *quant))
    assert result.exit_code == 0, result.stderr
    lines = result.stderr.strip().splitlines()
    assert all(line.startswith("model-opt: ") for line in lines), lines  # only our own progress
    log = tmp_path / "q.log"
    assert f"model-opt: backend messages (warnings, logs, progress bars): {log}" in lines
    text = log.read_text()
    assert "FutureWarning" in text or "nncf" in text.lower() or "Statistics collection" in text  # NNCF's own
    verbose = cli(*args(digits, *quant[:-1], str(tmp_path / "v.pt"), "--verbose"))
    assert verbose.exit_code == 0
    assert any(not line.startswith("model-opt: ") for line in verbose.stderr.strip().splitlines())
    assert not (tmp_path / "v.log").exists()


SEES_COMPILED = '''

_evaluate = evaluate


def evaluate(model, dataset_path):
    return {**_evaluate(model, dataset_path), "compiled": float(hasattr(model, "_orig_mod"))}
'''


@pytest.mark.slow
def test_compile_measures_the_metric_on_the_compiled_model(cli, digits, tmp_path: Path) -> None:
    """Under --compile the report's metric after is the compiled model's, the one deployed (a compiled graph's
    numerics can differ from eager's: int8 kernels, fusions), and the original's is eager's."""
    shutil.copy(digits.folder / "digits_model.py", tmp_path)
    script = tmp_path / "eval_sees.py"
    script.write_text(digits.script.read_text() + SEES_COMPILED)
    result = cli(*args(digits, *PRUNE, "--compile", "--output", str(tmp_path / "o.pt"), "--json", "-q",
                       script=script))
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["before"]["metrics"]["compiled"] == 0.0 and report["after"]["metrics"]["compiled"] == 1.0
    assert report["after"]["metrics"]["accuracy"] >= report["before"]["metrics"]["accuracy"] - 0.1
