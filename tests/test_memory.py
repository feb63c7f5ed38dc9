"""Peak memory as deployed (model_opt.memory): each model in a fresh process of its own."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from model_opt.errors import ModelOptError
from model_opt.memory import peak_memory
from model_opt.timing import Deployed


@pytest.mark.slow
def test_a_model_with_more_weights_peaks_higher_in_its_own_process(tmp_path: Path) -> None:
    small = torch.nn.Linear(8, 8)
    big = torch.nn.Sequential(torch.nn.Linear(8, 4096), torch.nn.Linear(4096, 4096), torch.nn.Linear(4096, 8))
    for name, model in {"small": small, "big": big}.items():  # TorchScript: reopens with no trust flag
        torch.jit.save(torch.jit.script(model.eval()), tmp_path / f"{name}.pt")
    peaks = peak_memory({name: Deployed(str(tmp_path / f"{name}.pt")) for name in ("small", "big")},
                        torch.randn(2, 8))
    weights = sum(p.numel() * 4 for p in big.parameters())  # 64 MiB
    assert peaks["small"] > 50 * 2**20  # the process's own runtime (Python, torch) is part of the figure
    assert peaks["big"] - peaks["small"] > 0.75 * weights, peaks


def test_a_model_that_does_not_open_is_a_one_line_error(tmp_path: Path) -> None:
    with pytest.raises(ModelOptError, match=r"the memory process for broken failed \(.*broken\.pt"):
        peak_memory({"broken": Deployed(str(tmp_path / "broken.pt"))}, torch.randn(1, 8))
