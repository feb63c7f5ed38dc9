"""The report's speed-up is the one a user gets: the saved models, each timed alone in a fresh process
(benchmarks/alone.py), agree with the report within 10%, also when the result runs in another runtime
(OpenVINO) than the original (torch). Timing is noisy on a shared machine, so the models alone are timed up
to three times; the report is not re-run."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ALONE = Path(__file__).parent.parent / "benchmarks" / "alone.py"


def alone_ms(model: Path, digits) -> float:
    proc = subprocess.run([sys.executable, str(ALONE), str(model), "--test-script", str(digits.script),
                           "--test-dataset", str(digits.dataset), "--calls", "300"], capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return float(proc.stdout.split("median_ms = ")[1].split()[0])


@pytest.mark.slow
@pytest.mark.parametrize("quant_opts", [[], ["--quant-opt", "static_shapes=true"]], ids=["dynamic", "static"])
def test_report_ratio_matches_the_models_timed_alone(cli, digits, tmp_path: Path, quant_opts: list) -> None:
    seen = []
    for attempt in range(2):  # a burst of other work can spoil one report: one more run, then fail
        out = tmp_path / f"int8-{attempt}.pt"
        result = cli("optimize", digits.model, "--test-dataset", digits.dataset, "--test-script", digits.script,
                     "--quantize", "--quant-backend", "nncf", "--quant-method", "int8_static", *quant_opts,
                     "--output", out, "--json", "-q")
        assert result.exit_code == 0, result.stderr
        report = json.loads(result.stdout)
        reported = report["before"]["latency"]["median_ms"] / report["after"]["latency"]["median_ms"]
        compiled_with = report["steps"][0]["info"]["compiled_with"]
        assert compiled_with.startswith("static shapes 32x1x8x8" if quant_opts else "dynamic shapes")
        for _ in range(3):
            alone = alone_ms(digits.model, digits) / alone_ms(out, digits)
            seen.append((round(reported, 2), round(alone, 2)))
            if abs(reported / alone - 1) <= 0.10:
                return
    pytest.fail(f"report vs alone never within 10%: {seen}")


@pytest.mark.slow
def test_autotune_trials_and_best_match_the_saved_model_timed_alone(cli, digits, tmp_path: Path) -> None:
    """autotune's trial table and its re-measured best time an OpenVINO result as deployed, like optimize."""
    out = tmp_path / "tuned.pt"
    result = cli("autotune", digits.model, "--test-dataset", digits.dataset, "--test-script", digits.script,
                 "--backends", "nncf", "--trials", "1", "--max-accuracy-drop", "0.05", "--output", out, "--json", "-q")
    assert result.exit_code == 0, result.stderr
    best = json.loads(result.stdout)["best"]
    assert [s["backend"] for s in best["steps"]] == ["nncf"]
    reported = {"trial table": best["speedup"], "re-measured": best["remeasured_speedup"]}
    # Two figures against noisy alone measurements: on this 2-core machine the same saved models timed alone
    # spread from 6x to 10x within minutes, so this bounds the figures within a factor of 1.5 of an alone
    # measurement (the optimize test above holds 10%); the mismatches it guards against were 2x-9x.
    seen: list[float] = []
    for _ in range(4):  # the models alone are timed again while a figure has no alone measurement that close
        seen.append(alone_ms(digits.model, digits) / alone_ms(out, digits))
        if all(any(1 / 1.5 <= value / alone <= 1.5 for alone in seen) for value in reported.values()):
            return
    pytest.fail(f"autotune's figures {reported} vs alone {[round(a, 2) for a in seen]}: not within a factor 1.5")
