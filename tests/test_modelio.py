"""Safe loading, atomic saving, and artifact round trips."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import model_opt
import pytest
import torch
from model_opt.atomic import atomic_path
from model_opt.errors import ModelLoadError
from torch import nn


def net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4)).eval()


def test_artifact_round_trip_gives_same_outputs(tmp_path: Path) -> None:
    model, x = net(), torch.randn(3, 8)
    path = model_opt.save(model, tmp_path / "m.pt", {"steps": []})
    torch.testing.assert_close(model_opt.load(path)(x), model(x), rtol=0, atol=0)
    from model_opt.modelio import read_manifest

    assert read_manifest(path)["format"] == "model-opt"


def test_artifact_reloads_in_a_fresh_process(digits, tmp_path: Path) -> None:
    """Classes defined beside the test script unpickle from the manifest's import paths."""
    from model_opt.pipeline import Step, optimize

    out = tmp_path / "pruned.pt"
    optimize(digits.model, test_script=digits.script, dataset=digits.dataset, output=out,
             steps=[Step("prune", "basic", "unstructured", {"amount": 0.5})])
    x = torch.rand(4, 1, 8, 8)
    expected = model_opt.load(out)(x)
    torch.save(x, tmp_path / "x.pt")
    code = ("import sys, torch, model_opt; m = model_opt.load(sys.argv[1]); "
            "torch.save(m(torch.load(sys.argv[2])), sys.argv[3])")
    subprocess.run([sys.executable, "-c", code, str(out), str(tmp_path / "x.pt"), str(tmp_path / "y.pt")],
                   check=True, cwd=tmp_path)
    torch.testing.assert_close(torch.load(tmp_path / "y.pt"), expected, rtol=0, atol=0)


def test_export_and_torchscript_files_load_without_trust(tmp_path: Path) -> None:
    model, x = net(), torch.randn(2, 8)
    torch.export.save(torch.export.export(model, (x,)), tmp_path / "m.pt2")
    torch.jit.save(torch.jit.script(model), tmp_path / "m.ts")
    for name in ("m.pt2", "m.ts"):
        torch.testing.assert_close(model_opt.load(tmp_path / name)(x), model(x))


def test_whole_pickle_needs_trust(tmp_path: Path) -> None:
    torch.save(net(), tmp_path / "whole.pth")
    with pytest.raises(ModelLoadError, match="is a pickled nn.Module, which runs code when loaded; pass --trust-model"):
        model_opt.load(tmp_path / "whole.pth")
    assert isinstance(model_opt.load(tmp_path / "whole.pth", trust_model=True), nn.Module)


@pytest.mark.parametrize(("content", "message"), [
    (b"hello, not a model", "is not a PyTorch model file"),
    (None, "model file not found"),
])
def test_bad_model_files(tmp_path: Path, content: bytes | None, message: str) -> None:
    path = tmp_path / "bad.pth"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(ModelLoadError, match=message):
        model_opt.load(path)


def test_state_dict_without_loader_explains_load_model(tmp_path: Path) -> None:
    torch.save(net().state_dict(), tmp_path / "sd.pth")
    with pytest.raises(ModelLoadError, match="holds weights only .* define load_model"):
        model_opt.load(tmp_path / "sd.pth")


def test_atomic_path_leaves_nothing_on_interrupt(tmp_path: Path) -> None:
    target = tmp_path / "out.pt"
    target.write_text("old")
    with pytest.raises(KeyboardInterrupt), atomic_path(target) as tmp:
        tmp.write_text("partial")
        raise KeyboardInterrupt
    assert target.read_text() == "old"
    assert os.listdir(tmp_path) == ["out.pt"]
