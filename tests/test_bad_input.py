"""Probed bad input: one line naming the problem and the fix, a non-zero exit, nothing written or lost."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from importlib.metadata import EntryPoint
from pathlib import Path

import model_opt
import pytest
import torch
from helpers import file_hash

PRUNE = ["--prune", "--prune-amount", "0.5"]


@pytest.fixture()
def work(digits, tmp_path: Path) -> Path:
    """A copy of the digits folder, as a user's own folder."""
    folder = tmp_path / "work"
    shutil.copytree(digits.folder, folder)
    return folder


def optimize_args(folder: Path, *extra) -> list:
    return ["optimize", folder / "model.pth", "--test-dataset", folder / "data", "--test-script",
            folder / "eval.py", *extra]


def listing(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): file_hash(p) for p in sorted(folder.rglob("*")) if p.is_file()}


def one_error(result, exit_code: int | None = None) -> str:
    lines = result.stderr.strip().splitlines()
    assert result.exit_code != 0 if exit_code is None else result.exit_code == exit_code, result.stderr
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.stderr
    return lines[0]


@pytest.mark.parametrize(("output", "message"), [
    ("eval.py", "would overwrite eval.py with the output"),
    ("report.json", "ends in .json, which model-opt uses for other files"),
    ("x.pt2", "ends in .pt2, which model-opt uses for other files"),
    ("digits_model.pt", "exists and is not a model-opt artifact; choose another path, or remove the file yourself"),
    ("data/m.pt", "is inside data/, an input folder"),
    ("model.pth", "would overwrite model.pth with the output"),
    ("model_whole.pth/x.pt", "cannot be made: "),
])
def test_output_collisions_are_refused(cli, work: Path, output: str, message: str) -> None:
    (work / "digits_model.pt").write_text("the user's own file")
    before = listing(work)
    line = one_error(cli(*optimize_args(work, *PRUNE, "--output", work / output, "-q")))
    assert message in line
    assert listing(work) == before


def test_export_beside_an_output_named_like_the_input(cli, work: Path) -> None:
    torch.export.save(torch.export.export(torch.nn.Linear(2, 2), (torch.randn(1, 2),)), work / "m.pt2")
    before = listing(work)
    result = cli("optimize", work / "m.pt2", "--test-dataset", work / "data", "--test-script", work / "eval.py",
                 *PRUNE, "--export", "--output", work / "m.pt", "-q")
    assert "would overwrite m.pt2 with the file m.pt2 (written beside the output)" in one_error(result)
    assert listing(work) == before


def test_two_runs_keep_their_reports_apart(cli, work: Path) -> None:
    for name in ("a.pt", "b.pt"):
        assert cli(*optimize_args(work, *PRUNE, "--output", work / name, "-q")).exit_code == 0
    assert json.loads((work / "a.report.json").read_text())["output"] == str(work / "a.pt")
    assert json.loads((work / "b.report.json").read_text())["output"] == str(work / "b.pt")
    assert oct((work / "a.pt").stat().st_mode & 0o777) == oct(0o666 & ~_umask())


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_demo_refuses_a_folder_with_the_users_files(cli, work: Path) -> None:
    (work / ".model-opt-demo").unlink()  # the user's own folder, not one the demo wrote
    before = listing(work)
    line = one_error(cli("demo", "--folder", work))
    assert "already holds digits_model.py, eval.py, eval_program.py, data, model.pth" in line
    assert listing(work) == before


@pytest.mark.parametrize(("extra", "message"), [
    (["--prune-amount", "nan"], "option 'amount' is nan, not a finite number"),
    (["--max-accuracy-drop", "nan"], "--max-accuracy-drop is nan, not a finite number"),
    (["--input-shape", "100000,1,8,100000000"], "has 80,000,000,000,000 elements, too many"),
    (["--prune-opt", "exclude=features.O"], "exclude=features.O names no module of the model; did you mean"),
])
def test_bad_numbers_and_names(cli, work: Path, extra: list[str], message: str) -> None:
    before = listing(work)
    line = one_error(cli(*optimize_args(work, "--prune", *extra, "-q")))
    assert message in line, line
    assert listing(work) == before


def test_nan_rank_ratio(cli, work: Path) -> None:
    line = one_error(cli(*optimize_args(work, "--decompose", "--rank-ratio", "nan", "-q")))
    assert "option 'rank_ratio' is nan, not a finite number" in line


@pytest.mark.parametrize(("extra", "message"), [
    (["--prune-amount", "0.9"], "--prune-amount is set, but --prune is not, so it would do nothing; add --prune"),
    (["--quant-method", "int8_dynamic", "--prune"], "--quant-method is set, but --quantize is not"),
    (["--rank-ratio", "0.5", "--prune"], "--rank-ratio is set, but --decompose is not"),
])
def test_flags_that_would_do_nothing(cli, work: Path, extra: list[str], message: str) -> None:
    assert message in one_error(cli(*optimize_args(work, *extra, "-q")), exit_code=2)


@pytest.mark.parametrize(("body", "message"), [
    ("def evaluate(model, dataset_path):\n    return float('inf')\n", "evaluate() returned inf for 'metric'"),
    ("HIGHER_IS_BETTER = 'False'\ndef evaluate(model, dataset_path):\n    return 1.0\n",
     "sets HIGHER_IS_BETTER = 'False', which is not True or False"),
])
def test_bad_test_script_values(cli, work: Path, body: str, message: str) -> None:
    script = work / "eval_bad.py"
    script.write_text(body)
    before = listing(work)
    result = cli("optimize", work / "model_whole.pth", "--trust-model", "--test-dataset", work / "data",
                 "--test-script", script, *PRUNE, "--input-shape", "1,1,8,8", "-q")
    assert message in one_error(result)
    assert listing(work) == before


PT2_SCRIPT = """
from pathlib import Path
import numpy as np
import torch

def _data(dataset_path):
    d = np.load(Path(dataset_path) / "test.npz")
    return torch.from_numpy(d["images"]).float().div(16).unsqueeze(1), torch.from_numpy(d["labels"]).long()

def evaluate(model, dataset_path):
    x, y = _data(dataset_path)
    with torch.no_grad():
        return {"accuracy": (model(x).argmax(1) == y).float().mean().item()}

def calibration_data(dataset_path):
    x, _ = _data(dataset_path)
    return [x[i:i + 8] for i in range(0, 64, 8)]
"""


@pytest.mark.slow
def test_exported_output_given_back_as_input_works(cli, work: Path) -> None:
    out = work / "first.pt"
    assert cli(*optimize_args(work, *PRUNE, "--export", "--output", out, "-q")).exit_code == 0
    program = work / "first.pt2"
    model = model_opt.load(program).eval()  # .eval() on a loaded program works
    assert model(torch.rand(2, 1, 8, 8)).shape == (2, 10)
    (work / "eval_pt2.py").write_text(PT2_SCRIPT)
    result = cli("optimize", program, "--test-dataset", work / "data", "--test-script", work / "eval_pt2.py",
                 "--quantize", "--quant-backend", "nncf", "--output", work / "second.pt", "-q", "--json")
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["after"]["metrics"]["accuracy"] >= report["before"]["metrics"]["accuracy"] - 0.02
    reopened = model_opt.load(work / "second.pt")  # standalone OpenVINO result: no architecture needed
    assert reopened(torch.rand(2, 1, 8, 8)).shape == (2, 10)


def test_prune_backend_without_prune_techniques_says_what_it_offers(cli, work: Path) -> None:
    line = one_error(cli(*optimize_args(work, "--decompose", "--decompose-backend", "nncf", "-q")))
    assert ("backend 'nncf' offers no decompose technique; it offers prune:regularization, prune:unstructured, "
            "quantize:int8_static, quantize:weight_only; for decompose, choose one of: svd") in line


def test_sigterm_while_saving_leaves_no_temporary_file(tmp_path: Path) -> None:
    code = """
import os, signal, sys, time
from model_opt_cli.main import handle_sigterm
from model_opt.atomic import atomic_path
handle_sigterm()
try:
    with atomic_path(sys.argv[1]) as tmp:
        tmp.write_bytes(b"x" * 1_000_000)
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(10)
except KeyboardInterrupt:
    sys.exit(130)
"""
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path / "big.pt")], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 130, proc.stderr
    assert os.listdir(tmp_path) == []


def test_output_lock_serializes_writers(tmp_path: Path) -> None:
    from model_opt.outputs import output_lock

    out = tmp_path / "o.pt"
    events: list[str] = []

    def first() -> None:
        with output_lock(out):
            events.append("first in")
            time.sleep(0.5)
            events.append("first out")

    thread = threading.Thread(target=first)
    thread.start()
    while not events:
        time.sleep(0.01)
    with output_lock(out):
        events.append("second in")
    thread.join()
    assert events == ["first in", "first out", "second in"]
    assert os.listdir(tmp_path) == []


def _entry_point_plugin(tmp_path: Path, monkeypatch, name: str, body: str) -> None:
    module = f"model_opt_probe_{name}"
    (tmp_path / f"{module}.py").write_text(body)
    monkeypatch.syspath_prepend(str(tmp_path))
    import model_opt.plugins as plugins

    real = plugins.entry_points

    def fake(group: str):
        return [*real(group=group), EntryPoint(name=name, value=module, group=group)]

    monkeypatch.setattr(plugins, "entry_points", fake)
    monkeypatch.setattr(plugins, "_MANAGER", None)


def test_a_plugin_that_exits_at_import_is_listed_broken(tmp_path: Path, monkeypatch, capsys) -> None:
    _entry_point_plugin(tmp_path, monkeypatch, "exiting", "import sys\nsys.exit(3)\n")
    from model_opt_cli.main import main

    monkeypatch.setattr(sys, "argv", ["model-opt", "plugins", "--json"])
    with pytest.raises(SystemExit) as exited:
        main()
    assert exited.value.code in (0, None)
    records = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    assert records["exiting"]["status"] == "broken"
    assert records["exiting"]["reason"] == "import failed: SystemExit: 3"


def test_a_plugin_that_prints_at_import_keeps_json_clean(tmp_path: Path, monkeypatch, capsys) -> None:
    _entry_point_plugin(tmp_path, monkeypatch, "chatty", "print('hello from a plugin')\n")
    from model_opt_cli.main import main

    monkeypatch.setattr(sys, "argv", ["model-opt", "plugins", "--json"])
    with pytest.raises(SystemExit):
        main()
    captured = capsys.readouterr()
    assert "hello from a plugin" in captured.err
    assert {r["name"] for r in json.loads(captured.out)} >= {"chatty", "basic"}


def test_kill_during_a_run_keeps_the_input(work: Path) -> None:
    """A real `model-opt optimize` process killed with SIGTERM mid-run: input untouched, no temp files."""
    before = listing(work)
    proc = subprocess.Popen([sys.executable, "-m", "model_opt_cli.main", *map(str, optimize_args(
        work, *PRUNE, "--output", work / "out.pt"))], stderr=subprocess.PIPE, text=True)
    for line in proc.stderr:
        if "measuring the original model" in line:
            proc.send_signal(signal.SIGTERM)
            break
    proc.communicate(timeout=120)
    assert proc.returncode == 130
    assert listing(work) == before


@pytest.mark.parametrize(("variable", "value", "message"), [
    ("MODEL_OPT_TIMING", "garbage", "MODEL_OPT_TIMING='garbage' is not inline or process"),
    ("MODEL_OPT_TIMING_S", "-1", "MODEL_OPT_TIMING_S='-1' is not a number of seconds above 0 and up to 3600"),
    ("MODEL_OPT_TIMING_S", "soon", "MODEL_OPT_TIMING_S='soon' is not a number of seconds above 0 and up to 3600"),
])
def test_a_timing_setting_that_means_nothing_is_refused(cli, work: Path, monkeypatch, variable: str, value: str,
                                                        message: str) -> None:
    monkeypatch.setenv(variable, value)
    before = listing(work)
    line = one_error(cli(*optimize_args(work, *PRUNE, "-q")), exit_code=2)
    assert message in line and "or unset it" in line
    assert listing(work) == before


def test_autotune_names_the_installed_backends_for_an_unknown_one(cli, work: Path) -> None:
    line = one_error(cli("autotune", work / "model.pth", "--test-dataset", work / "data", "--test-script",
                         work / "eval.py", "--max-accuracy-drop", "0.01", "--backends", "torch-prunin", "-q"),
                     exit_code=2)
    assert "unknown --backends name 'torch-prunin' (did you mean 'torch-pruning'?)" in line
    assert "choose one of:" in line and "model-opt[all]" not in line
