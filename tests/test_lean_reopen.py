"""An optimized Hugging Face model reopens without building its float weights: the architecture is built from the
recorded config with its parameters on the meta device, the steps are replayed on shapes, and the saved tensors are
assigned (a folder's file mapped, not copied)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import model_opt
import pytest
import torch
from model_opt.sources import read_config
from model_opt.techniques import Quantizer

#: Run in a fresh process: a small model made the same way is opened and run first (every module the reopening
#: imports is imported, the thread pool started: importing a BLAS under a cap hangs), then the data segment is
#: capped at what the process holds plus ``headroom`` bytes, and the model is opened and run; its logits are
#: written for the test to compare.
OPEN_CAPPED = """
import json, resource, sys
import torch, transformers, model_opt
warm, folder, ids, headroom, out = sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
def open_model(path):
    return model_opt.load(path)
with torch.inference_mode():
    open_model(warm)(torch.tensor([ids]))
held = next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith("VmData:"))
resource.setrlimit(resource.RLIMIT_DATA, (held + headroom, resource.RLIM_INFINITY))
model = open_model(folder)
with torch.inference_mode():
    torch.save(model(torch.tensor([ids])).logits, out)
"""


def _llama(folder: Path, hidden: int = 512) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=hidden, intermediate_size=hidden * 11 // 4, num_hidden_layers=8,
                         num_attention_heads=8, num_key_value_heads=4, vocab_size=8000, max_position_embeddings=128)
    model = LlamaForCausalLM(config).eval()
    model.save_pretrained(folder)
    return model


@pytest.mark.slow
@pytest.mark.parametrize("options", [{"method": "int8_weight_only", "backend": "torchao"},
                                     {"method": "weight_only", "backend": "nncf", "mode": "int4_sym",
                                      "group_size": 64}], ids=["torchao-int8", "nncf-int4"])
def test_a_quantized_llama_reopens_where_its_float_weights_would_not_fit(tmp_path: Path, options: dict) -> None:
    ids = [3, 14, 15, 92, 65, 35, 89, 79]
    for name, hidden in (("warm", 64), ("model", 768)):  # (the small one warms the capped process up)
        model = _llama(tmp_path / name, hidden)
        float_bytes = sum(p.numel() * 4 for p in model.parameters())  # 260 MB for the model (NNCF packs in place)
        quantized = Quantizer().quantize(model, **options, example_input={"input_ids": torch.tensor([ids])})[0]
        source = {"path": str(tmp_path / name), "opened_with": "folder", "config": read_config(tmp_path / name)}
        model_opt.save(quantized, f"{tmp_path / name}-out/", {"source": source})
    with torch.inference_mode():
        expected = quantized(torch.tensor([ids])).logits
    out, headroom = tmp_path / "logits.pt", str(int(0.5 * float_bytes))

    def capped(code: str, folder: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-c", code, str(tmp_path / "warm-out"), folder, json.dumps(ids),
                               headroom, str(out)], capture_output=True, text=True, timeout=300)

    done = capped(OPEN_CAPPED, str(tmp_path / "model-out"))
    assert done.returncode == 0, done.stderr[-2000:]
    torch.testing.assert_close(torch.load(out), expected, rtol=1e-4, atol=1e-4)
    # the cap is real: the float model does not open under it
    done = capped(OPEN_CAPPED.replace("model = open_model(folder)", "model = transformers.AutoModelForCausalLM."
                                      "from_pretrained(folder)"), str(tmp_path / "model"))
    assert done.returncode != 0 and "memory" in done.stderr.lower(), done.stderr[-2000:]

def test_two_steps_replay_on_shapes_and_every_tensor_is_filled(tmp_path: Path) -> None:
    """SVD's replay swaps each recorded layer for an empty low-rank pair, then torchao's takes the int8 weights:
    on the architecture without weights, the reopened model gives the optimized model's outputs and holds no tensor
    without data."""
    from model_opt.techniques import Decomposer

    model = _llama(tmp_path / "model", hidden=128)
    low_rank = Decomposer().decompose_model(model, method="svd", rank_ratio=0.5)
    optimized = Quantizer().quantize(low_rank, method="int8_weight_only", backend="torchao")[0]
    source = {"path": str(tmp_path / "model"), "opened_with": "folder", "config": read_config(tmp_path / "model")}
    model_opt.save(optimized, f"{tmp_path / 'out'}/", {"source": source})
    reopened = model_opt.load(str(tmp_path / "out"))
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.inference_mode():
        torch.testing.assert_close(reopened(ids).logits, optimized(ids).logits)
    assert not any(t.device.type == "meta" for t in [*reopened.parameters(), *reopened.buffers()])
    assert sum(p.numel() for p in reopened.parameters()) == sum(p.numel() for p in optimized.parameters())
