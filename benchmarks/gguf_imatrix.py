"""Perplexity of the llama-cpp plugin's GGUF types with and without an importance matrix, on held-out text.

The model is the one ``benchmarks/lm_routes.py --train-minutes 3`` trained and saved (a Llama-shaped model
trained on Python's help texts, under $TMPDIR/model-opt-lm-routes-bench): the matrix is computed from windows of
the training text (the first nine tenths of the corpus), and perplexity is measured by the built-in evaluation on
the held-out tenth that lm_routes.py saved, which neither training nor the matrix saw. Every type is quantized
twice from the same float32 GGUF by llama.cpp's own quantizer: ``imatrix=off`` and ``imatrix=on``.

    python benchmarks/lm_routes.py --train-minutes 3      # once: the trained model and its held-out text
    python benchmarks/gguf_imatrix.py [--types q4_0 q4_k_m q3_k_m q2_k] [--windows 16]
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import machine, table  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--types", nargs="*", default=["q4_0", "q4_k_m", "q3_k_m", "q2_k"])
    parser.add_argument("--windows", type=int, default=16, help="calibration windows of 128 training tokens")
    args = parser.parse_args()
    os.environ.setdefault("MODEL_OPT_LM_WINDOW", "128")
    os.environ.setdefault("MODEL_OPT_LM_WINDOWS", "24")
    from causal_lm import corpus
    from model_opt.builtin import lm_eval
    from model_opt.techniques import Quantizer
    from transformers import AutoModelForCausalLM, AutoTokenizer

    work = Path(os.environ.get("TMPDIR", "/tmp")) / "model-opt-lm-routes-bench"
    model_path, text = work / "model", work / "text"
    if not (model_path / "config.json").is_file():
        sys.exit(f"no trained model under {work}: run python benchmarks/lm_routes.py --train-minutes 3 first")
    print(machine())
    model = AutoModelForCausalLM.from_pretrained(model_path).eval()
    ids = AutoTokenizer.from_pretrained(model_path)(corpus(), return_tensors="pt")["input_ids"][0]
    training = ids[: int(len(ids) * 0.9)]
    step = len(training) // args.windows
    calibration = [{"input_ids": training[i * step: i * step + 128][None]} for i in range(args.windows)]
    base = lm_eval.evaluate(model, str(text), str(model_path), fraction=1.0)["perplexity"]  # (no timing)
    rows = [{"type": "float (torch)", "imatrix": "-", "perplexity": base, "vs float": 1.0}]
    for kind in args.types:
        for choice in ("off", "on"):
            result, info = Quantizer().quantize(model, method="gguf", backend="llama-cpp", type=kind, imatrix=choice,
                                                calibration_data=calibration)
            perplexity = lm_eval.evaluate(result, str(text), str(model_path), fraction=1.0)["perplexity"]
            rows.append({"type": kind, "imatrix": info["imatrix"], "perplexity": perplexity,
                         "vs float": perplexity / base})
            del result
    print(table(f"GGUF perplexity on held-out text ({lm_eval.settings()['windows']} windows of "
                f"{lm_eval.settings()['window']} tokens), importance matrix from {args.windows} training windows",
                rows))


if __name__ == "__main__":
    main()
