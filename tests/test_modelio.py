"""Safe loading, atomic saving, and artifact round trips."""

from __future__ import annotations

import os
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
    fresh = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    torch.testing.assert_close(model_opt.load(path, model=fresh)(x), model(x), rtol=0, atol=0)
    from model_opt.artifact.format import read_manifest

    manifest = read_manifest(path)
    assert manifest["format"] == "model-opt" and manifest["format_version"] == 2
    assert manifest["payload"] == "weights"
    with pytest.raises(ModelLoadError, match="records no source model to rebuild the architecture from; pass "
                                             "model="):
        model_opt.load(path)


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
