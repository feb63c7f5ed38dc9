"""`model-opt demo` trains the shipped example and prints a before/after report."""

from __future__ import annotations

from pathlib import Path


def test_demo_runs_end_to_end(cli, tmp_path: Path) -> None:
    result = cli("demo", "--folder", str(tmp_path / "demo"), "--epochs", "4")
    assert result.exit_code == 0, result.stderr
    assert "accuracy (primary)" in result.stdout
    assert "non-zero parameters" in result.stdout
    assert (tmp_path / "demo" / "model.optimized.pt").exists()
    assert (tmp_path / "demo" / "model.optimized.report.json").exists()
    assert "model-opt optimize" in result.stderr  # the equivalent command is shown
