"""`model-opt demo` trains the shipped example, recommends, and shows a technique that makes it faster."""

from __future__ import annotations

import json
from pathlib import Path

import pytest


@pytest.mark.slow
def test_demo_recommends_and_shows_a_real_speed_up(cli, tmp_path: Path) -> None:
    result = cli("demo", "--folder", str(tmp_path / "demo"), "--epochs", "4")
    assert result.exit_code == 0, result.stderr
    assert ": cnn (2 convolutions, no attention)" in result.stdout  # the recommendation comes first
    assert "- quantize nncf:int8_static:" in result.stdout
    assert "accuracy (primary)" in result.stdout
    report = json.loads((tmp_path / "demo" / "model.optimized.report.json").read_text())
    assert report["steps"][0]["backend"] == "nncf"  # the first recommended technique that is fast on CPU
    assert not any("does not reduce latency" in w for w in report["warnings"])
    assert "running: model-opt optimize" in result.stderr  # the equivalent command is shown
