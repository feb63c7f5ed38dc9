"""Every technique's output reopens through the safe format (recipe + weights, replayed on a fresh
architecture) in a fresh process, without a trust flag, and gives the same outputs."""

from __future__ import annotations

import json
import subprocess
import sys
import zipfile
from pathlib import Path

import model_opt
import pytest
import torch
from replay_models import CASES, optimize, run

RELOAD = """
import json, sys, torch, model_opt
from replay_models import CASES, run
folder = sys.argv[1]
for name in json.loads(sys.argv[2]):
    build, _ = CASES[name]
    model = model_opt.load(f"{folder}/{name}.pt", model=build())
    torch.save(run(model, torch.load(f"{folder}/{name}.x.pt")), f"{folder}/{name}.y.pt")
"""


@pytest.mark.slow
def test_every_technique_reopens_in_a_fresh_process(tmp_path: Path) -> None:
    names = list(CASES)
    expected = {}
    for name in names:
        model, x = optimize(name)
        expected[name] = run(model, x)
        path = model_opt.save(model, tmp_path / f"{name}.pt")
        manifest = json.loads(zipfile.ZipFile(path).read("model_opt.json"))
        assert manifest["payload"] == "weights", name  # nothing pickled
        assert "model.pt" not in zipfile.ZipFile(path).namelist()
        torch.save(x, tmp_path / f"{name}.x.pt")
    tests = str(Path(__file__).parent)
    subprocess.run([sys.executable, "-c", RELOAD, str(tmp_path), json.dumps(names)], check=True, cwd=tmp_path,
                   env={**__import__("os").environ, "PYTHONPATH": tests})
    for name in names:
        got = torch.load(tmp_path / f"{name}.y.pt")
        torch.testing.assert_close(got, expected[name], rtol=1e-5, atol=1e-5, msg=name)
