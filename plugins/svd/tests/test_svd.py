"""SVD decomposition on trained weights: metric kept, parameter formula, break-even skips, reload."""

from __future__ import annotations

import json
from pathlib import Path

import model_opt
import numpy as np
import pytest
import torch
from model_opt.errors import UsageError
from model_opt.examples.digits import HERE as DIGITS
from model_opt.techniques import Decomposer
from model_opt_svd.lowrank import LowRankConv2d, LowRankLinear, low_rank_conv
from torch import nn


@pytest.fixture(scope="module")
def trained_mlp():
    """An MLP trained on the digits (random weights have a flat spectrum and say nothing)."""
    data = np.load(DIGITS / "digits.npz")
    x = torch.from_numpy(data["images"]).float().div(16).reshape(-1, 64)
    y = torch.from_numpy(data["labels"]).long()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10))
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3, weight_decay=1e-4)
    train_x, train_y, test_x, test_y = x[360:], y[360:], x[:360], y[:360]
    for _ in range(30):
        for batch in torch.randperm(len(train_y)).split(64):
            loss = nn.functional.cross_entropy(model(train_x[batch]), train_y[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return model.eval(), test_x, test_y


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return (model(x).argmax(1) == y).float().mean().item()


def test_energy_095_keeps_accuracy_and_shrinks(trained_mlp) -> None:
    import copy

    model, x, y = trained_mlp
    base = accuracy(model, x, y)
    decomposer = Decomposer()
    small = decomposer.decompose_model(copy.deepcopy(model), method="svd", rank_ratio=None, energy=0.95)
    assert base > 0.95
    assert accuracy(small, x, y) >= base - 0.03  # stated bound: at most 3 points lost at 95% energy
    assert sum(p.numel() for p in small.parameters()) < sum(p.numel() for p in model.parameters())
    assert isinstance(small[2], LowRankLinear)


def test_parameter_counts_match_the_formula() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(384, 1536), nn.GELU(), nn.Linear(1536, 384))
    decomposer = Decomposer()
    decomposer.decompose_model(model, rank_ratio=0.25)
    r = round(0.25 * 384)
    for name in ("0", "2"):
        assert decomposer.info["layers"][name]["rank"] == r
        layer = model.get_submodule(name)
        assert sum(p.numel() for p in layer.parameters()) == r * (384 + 1536) + layer.out_features


def test_layers_that_would_not_shrink_are_skipped_and_reported() -> None:
    square = nn.Sequential(nn.Linear(256, 256))
    decomposer = Decomposer()
    decomposer.decompose_model(square, rank_ratio=0.5)
    assert decomposer.info["replaced"] == 0
    assert "break-even rank ratio 0.50" in decomposer.info["skipped"]["0"]
    wide = nn.Sequential(nn.Linear(384, 1536))
    decomposer.decompose_model(wide, rank_ratio=0.81)
    assert "break-even rank ratio 0.80" in decomposer.info["skipped"]["0"]
    decomposer.decompose_model(wide, rank_ratio=0.79)
    assert decomposer.info["replaced"] == 1


def test_conv_factorization_is_exact_at_full_rank_and_saves_at_low_rank() -> None:
    torch.manual_seed(0)
    conv = nn.Conv2d(16, 32, 3, padding=1, stride=2)
    x = torch.randn(2, 16, 9, 9)
    full = low_rank_conv(conv, rank=32)
    torch.testing.assert_close(full(x), conv(x), atol=1e-5, rtol=1e-5)
    model = nn.Sequential(conv)
    Decomposer().decompose_model(model, rank_ratio=0.25)
    assert isinstance(model[0], LowRankConv2d) and model[0].rank == 8
    assert model[0](x).shape == conv(x).shape


def test_include_exclude_and_reload(tmp_path: Path, trained_mlp) -> None:
    import copy

    model, x, _ = trained_mlp
    decomposer = Decomposer()
    small = decomposer.decompose_model(copy.deepcopy(model), rank_ratio=0.25, exclude=["4"], include=["2", "4"])
    assert list(decomposer.info["layers"]) == ["2"]
    model_opt.save(small, tmp_path / "svd.pt")
    with torch.no_grad():
        reloaded = model_opt.load(tmp_path / "svd.pt", model=copy.deepcopy(model))
        torch.testing.assert_close(reloaded(x), small(x), rtol=0, atol=0)


@pytest.mark.parametrize(("options", "message"), [
    ({"rank_ratio": 0.0}, r"rank_ratio' is 0, outside \(0, 1\]"),
    ({"rank_ratio": 1.5}, r"rank_ratio' is 1.5, outside \(0, 1\]"),
    ({"energy": 1.2}, r"energy' is 1.2, outside \(0, 1\]"),
])
def test_bad_ratios(options, message) -> None:
    with pytest.raises(UsageError, match=message):
        Decomposer().decompose_model(nn.Linear(64, 64), **options)


def test_cli_decompose_on_digits(cli, digits, tmp_path: Path) -> None:
    base = ["optimize", digits.model, "--test-dataset", digits.dataset, "--test-script", digits.script, "-q"]
    result = cli(*base, "--decompose", "--rank-ratio", "0.25", "--decompose-opt", "include=classifier",
                 "--output", tmp_path / "d.pt", "--json")
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["steps"][0]["info"]["replaced"] == 1
    assert report["after"]["parameters"] < report["before"]["parameters"]
    result = cli(*base, "--decompose", "--rank-ratio", "0.9", "--decompose-opt", "include=classifier.3",
                 "--output", tmp_path / "e.pt")
    assert result.exit_code == 1 and "nothing was optimized" in result.stderr
