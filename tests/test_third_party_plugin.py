"""A third party's plugin, pip-installed from its own distribution, works with no change to the core."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

DATA = Path(__file__).parent / "data"
DISTS = {"model-opt-strip-dropout": DATA / "example_plugin", "model-opt-broken-example": DATA / "broken_plugin"}


def pip(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "pip", "-q", *args], check=True, capture_output=True)


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory):
    build = tmp_path_factory.mktemp("plugins")
    for name, source in DISTS.items():
        shutil.copytree(source, build / name)
        pip("install", "--no-deps", "--no-build-isolation", str(build / name))
    try:
        yield
    finally:
        pip("uninstall", "-y", *DISTS)


def run(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "model_opt_cli.main", *args], capture_output=True, text=True,
                          cwd=cwd)


def test_listed_in_plugins_and_broken_one_is_isolated(installed) -> None:
    proc = run("plugins", "--json")
    assert proc.returncode == 0, proc.stderr
    records = {r["name"]: r for r in json.loads(proc.stdout)}
    assert records["strip-dropout"]["status"] == "ok"
    assert records["strip-dropout"]["version"] == "1.0.0"
    assert records["strip-dropout"]["techniques"] == ["fuse:example:strip_dropout"]
    broken = records["broken-example"]
    assert broken["status"] == "broken"
    assert broken["reason"] == "import failed: ModuleNotFoundError: No module named 'no_such_backend_package'"
    assert records["basic"]["status"] == "ok"
    text = run("plugins").stdout
    assert "broken-example 0.0.1 [broken]" in text


def test_technique_runs_through_the_python_api(installed) -> None:
    code = """
import torch
from model_opt.techniques import LayerFuser
from model_opt.techniques import run_technique
model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Dropout(0.5), torch.nn.Linear(4, 2)).eval()
x = torch.randn(3, 4)
expected = model(x)
model, info = run_technique("fuse", model, backend="example", method="strip_dropout")
assert info == {"replaced": ["1"]}, info
assert not any(isinstance(m, torch.nn.Dropout) for m in model.modules())
assert torch.equal(model(x), expected)
print("ok")
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.stdout.strip() == "ok", proc.stderr


def test_its_kind_level_option_is_a_flag_of_optimize(installed) -> None:
    import re

    help_text = " ".join(re.sub(r"[│╭╮╰╯─]", " ", run("optimize", "--help").stdout).split())
    assert "--fuse-min-p" in help_text and "Strip only Dropout layers with p at least this." in help_text
    assert "--fuse-min-p <float>: strip only Dropout layers with p at least this (default 0.0; range: [0, inf])" \
        in run("techniques").stdout
    proc = run("optimize", "model.pt", "--test-dataset", ".", "--test-script", "eval.py", "--fuse-min-p", "0.2")
    assert proc.returncode == 2 and proc.stderr.strip() == \
        "Error: --fuse-min-p is set, but --fuse is not, so it would do nothing; add --fuse, or drop --fuse-min-p"


@pytest.mark.slow
def test_technique_runs_through_optimize(installed, digits, tmp_path: Path) -> None:
    out = tmp_path / "o.pt"
    proc = run("optimize", str(digits.model), "--test-dataset", str(digits.dataset), "--test-script",
               str(digits.script), "--fuse", "--fuse-backend", "example", "--fuse-types", "strip_dropout",
               "--fuse-min-p", "0.2", "--output", str(out), "--json", "-q")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["steps"][0]["plugin"] == "strip-dropout"
    assert report["steps"][0]["info"] == {"replaced": []}
    assert report["steps"][0]["options"]["min_p"] == 0.2
    assert report["after"]["metrics"] == report["before"]["metrics"]
    assert out.exists()
