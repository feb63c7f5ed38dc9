"""The figures every command reports are the ones a user gets: the saved models, each timed alone in a fresh
process (benchmarks/alone.py), agree with optimize's report and with autotune's trial table and re-measured best
within 10%, also when the result runs in another runtime (OpenVINO) than the original (torch).

Timing is noisy on a shared machine: the same two saved models, timed alone one after the other, gave ratios
from 2.9x to 3.2x in one minute and 3.6x to 4.3x a few minutes later here, while optimize's report read 3.35x to
3.5x. So the models alone are timed up to four times, and a figure passes when it lies within 10% of the range of
those ratios (within 10% of one of them, or between two); a command whose figures do not is run again, up to
three runs in all (autotune in a study of its own each time, so that its trial is new). The mismatches this
guards against were 2x to 9x, which no retry brings within 10%."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ALONE = Path(__file__).parent.parent / "benchmarks" / "alone.py"


@pytest.fixture(autouse=True)
def _full_timing(full_timing) -> None:
    """These tests compare the figures: every command times as a user's run does."""


def alone_ms(model: Path, digits) -> float:
    proc = subprocess.run([sys.executable, str(ALONE), str(model), "--test-script", str(digits.script),
                           "--test-dataset", str(digits.dataset), "--calls", "300"], capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return float(proc.stdout.split("median_ms = ")[1].split()[0])


def match_alone(figures: dict[str, float], result: Path, digits, seen: list) -> bool:
    """Whether every figure lies within 10% of the range of the ratios of the original to ``result``, both timed
    alone (up to four pairs); the pairs' ratios are added to ``seen``."""
    ratios: list[float] = []
    for _ in range(4):
        ratios.append(alone_ms(digits.model, digits) / alone_ms(result, digits))
        seen.append({**{k: round(v, 2) for k, v in figures.items()}, "alone": round(ratios[-1], 2)})
        if all(0.9 * min(ratios) <= value <= 1.1 * max(ratios) for value in figures.values()):
            return True
    return False


@pytest.mark.slow
@pytest.mark.parametrize("quant_opts", [[], ["--quant-opt", "static_shapes=true"]], ids=["dynamic", "static"])
def test_report_ratio_matches_the_models_timed_alone(cli, digits, tmp_path: Path, quant_opts: list) -> None:
    seen: list = []
    for attempt in range(3):
        out = tmp_path / f"int8-{attempt}.pt"
        result = cli("optimize", digits.model, "--test-dataset", digits.dataset, "--test-script", digits.script,
                     "--quantize", "--quant-backend", "nncf", "--quant-method", "int8_static", *quant_opts,
                     "--output", out, "--json", "-q")
        assert result.exit_code == 0, result.stderr
        report = json.loads(result.stdout)
        compiled_with = report["steps"][0]["info"]["compiled_with"]
        assert compiled_with.startswith("static shapes 32x1x8x8" if quant_opts else "dynamic shapes")
        reported = report["before"]["latency"]["median_ms"] / report["after"]["latency"]["median_ms"]
        if match_alone({"report": reported}, out, digits, seen):
            return
    pytest.fail(f"report vs alone never within 10%: {seen}")


@pytest.mark.slow
def test_autotune_trials_and_best_match_the_saved_model_timed_alone(cli, digits, tmp_path: Path) -> None:
    """autotune's trial table and its re-measured best time an OpenVINO result as deployed, like optimize."""
    seen: list = []
    for attempt in range(3):
        out = tmp_path / f"tuned-{attempt}.pt"
        result = cli("autotune", digits.model, "--test-dataset", digits.dataset, "--test-script", digits.script,
                     "--backends", "nncf", "--trials", "1", "--max-accuracy-drop", "0.05", "--output", out, "--json",
                     "-q", "--study", f"deployed-speed-{attempt}")  # a study of its own: a new trial each time
        assert result.exit_code == 0, result.stderr
        best = json.loads(result.stdout)["best"]
        assert [s["backend"] for s in best["steps"]] == ["nncf"]
        if match_alone({"trial table": best["speedup"], "re-measured": best["remeasured_speedup"]}, out, digits,
                       seen):
            return
    pytest.fail(f"autotune's figures vs alone never within 10%: {seen}")
