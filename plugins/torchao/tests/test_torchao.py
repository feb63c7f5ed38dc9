"""torchao quantization through model-opt: outputs, size, reload, autoquant, compile runtime, bad input."""

from __future__ import annotations

import io
import json
from pathlib import Path

import model_opt
import pytest
import torch
from model_opt.device import slow_here
from model_opt.errors import DeviceError, TechniqueError, UsageError
from model_opt.techniques import Quantizer
from torch import nn


def mlp(width: int = 256) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(),
                         nn.Linear(width, 10)).eval()


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0).item()


def state_bytes(model: nn.Module) -> int:
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    return buffer.tell()


@pytest.mark.parametrize("method", ["int8_weight_only", "int8_dynamic"])
def test_int8_methods_keep_outputs_shrink_weights_and_reload(method: str, tmp_path: Path) -> None:
    model, x = mlp(), torch.randn(32, 64)
    with torch.no_grad():
        expected = model(x)
    float_bytes = state_bytes(model)
    quantized, info = Quantizer().quantize(model, method=method, example_input=x, skip_head=False)
    assert info["quantized"] == ["0", "2", "4"]
    with torch.no_grad():
        out = quantized(x)
    assert cosine(out, expected) > 0.999
    assert state_bytes(quantized) <= 0.3 * float_bytes
    # model-opt's artifact reloads with the same outputs
    model_opt.save(quantized, tmp_path / "q.pt")
    with torch.no_grad():
        torch.testing.assert_close(model_opt.load(tmp_path / "q.pt", model=mlp())(x), out, rtol=0, atol=0)
    # and the torchao way: weights_only state_dict into the float architecture with assign=True
    torch.save(quantized.state_dict(), tmp_path / "sd.pt")
    rebuilt = mlp()
    rebuilt.load_state_dict(torch.load(tmp_path / "sd.pt", weights_only=True), assign=True)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(x), out, rtol=0, atol=0)


def test_head_and_small_layers_are_skipped_and_reported() -> None:
    model, x = mlp(), torch.randn(4, 64)
    _, info = Quantizer().quantize(model, method="int8_weight_only", example_input=x, min_features=100)
    assert info["quantized"] == ["2"]
    assert info["skipped"] == {"0": "min(in, out) below min_features 100", "4": "classifier head (skip_head)"}


def test_autoquant_result_reloads(tmp_path: Path) -> None:
    """Which layers autoquant quantizes depends on what it timed (on a busy machine, any of them); the contract is
    that the reloaded model has exactly the layers the result has, of the same weight types, and its outputs."""
    model, x = mlp(512), torch.randn(64, 64)
    quantized, info = Quantizer().quantize(model, method="autoquant", example_input=x, skip_head=False,
                                           candidates=["int8_weight_only"], tolerance=1.0)
    chosen = set(info["quantized"].get("int8_weight_only", []))
    assert chosen <= {"0", "2", "4"} and bool(chosen) == bool(info["changed"])

    def weight_types(m: torch.nn.Module) -> dict[str, str]:
        return {name: type(layer.weight).__name__ for name, layer in m.named_modules()
                if isinstance(layer, torch.nn.Linear)}

    assert {name for name, kind in weight_types(quantized).items() if kind != "Parameter"} == chosen
    model_opt.save(quantized, tmp_path / "aq.pt")
    reloaded = model_opt.load(tmp_path / "aq.pt", model=mlp(512))
    assert weight_types(reloaded) == weight_types(quantized)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(x), quantized(x), rtol=0, atol=0)


def test_autoquant_picks_the_fastest_within_tolerance() -> None:
    model, x = mlp(512), torch.randn(64, 64)
    with torch.no_grad():
        expected = model(x)
    quantized, info = Quantizer().quantize(model, method="autoquant", example_input=x, skip_head=False)
    assert info["runtime"] == "eager"
    assert len(info["choices"]) == 3  # three distinct shapes
    for decision in info["choices"].values():
        trials = decision["trials"]
        assert set(trials) == {"float", "int8_weight_only", "int8_dynamic"}
        ok = {m: t["ms"] for m, t in trials.items() if t.get("ms") is not None and t["error"] <= 0.05}
        assert decision["choice"] == min(ok, key=ok.get)
    with torch.no_grad():
        assert cosine(quantized(x), expected) > 0.99


def test_cuda_only_methods_are_refused_on_cpu() -> None:
    with pytest.raises(DeviceError, match="torchao int4_weight_only runs only on a CUDA GPU; use --device cuda"):
        Quantizer().quantize(mlp(), method="int4_weight_only", example_input=torch.randn(2, 64))
    with pytest.raises(DeviceError, match="float8_dynamic runs only on a CUDA GPU"):
        Quantizer().quantize(mlp(), method="float8_dynamic")


def test_bad_input() -> None:
    conv = nn.Sequential(nn.Conv2d(3, 8, 3)).eval()
    with pytest.raises(TechniqueError, match="has no Linear layer that torchao int8_dynamic can quantize"):
        Quantizer().quantize(conv, method="int8_dynamic", example_input=torch.randn(1, 3, 8, 8))
    with pytest.raises(UsageError, match=r"the example input \(2, 63\) does not fit the model at layer 0 "
                                         r"\(Linear\) with input \(2, 63\)"):
        Quantizer().quantize(mlp(), method="autoquant", example_input=torch.randn(2, 63))
    with pytest.raises(UsageError, match=r"unknown quantize method of backend 'torchao' 'int8_dynamc' "
                                         r"\(did you mean 'int8_dynamic'\?\)"):
        Quantizer().quantize(mlp(), method="int8_dynamc", backend="torchao")


@pytest.mark.slow
def test_cli_eager_warns_and_compile_measures_the_compiled_runtime(cli, digits, tmp_path: Path) -> None:
    base = ["optimize", digits.model, "--test-dataset", digits.dataset, "--test-script", digits.script,
            "--quantize", "--quant-method", "int8_dynamic", "--quant-opt", "skip_head=false", "-q"]
    result = cli(*base, "--output", tmp_path / "eager.pt", "--json")
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["after"]["latency"]["runtime"] == "eager"
    # with int8 dot products the advice is to compile; without them (AVX2) compiling does not help either
    expected = ("torchao int8_dynamic is slow on this CPU: it needs int8 dot-product instructions"
                if slow_here({"int8 dot products": ""}) else
                "only under torch.compile with freezing: rerun with --compile")
    assert any(expected in w for w in report["warnings"]), report["warnings"]
    assert report["after"]["size_bytes"] < 0.4 * report["before"]["size_bytes"]
    result = cli(*base, "--output", tmp_path / "compiled.pt", "--compile", "--json")
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["after"]["latency"]["runtime"] == "compiled"
    assert report["compile_seconds"] > 0
    # the float model compiled too, timed in the same rounds: the speed-up split into the runtime's part and
    # int8's own
    assert report["runtime_latency"]["runtime"] == "compiled" and report["runtime_latency"]["median_ms"] > 0
    summary = report["summary"]
    if summary["speedup"] is not None:
        assert summary["speedup"] == pytest.approx(summary["speedup_runtime"] * summary["speedup_technique"])
    text = cli(*base, "--output", tmp_path / "compiled.pt", "--compile").stdout
    assert "of which the runtime (eager -> float compiled)" in text and "of which the technique (compiled both)" \
        in text
    assert not any("rerun with --compile" in w for w in report["warnings"])
    assert report["after"]["metrics"]["accuracy"] >= report["before"]["metrics"]["accuracy"] - 0.02


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_int4_weight_only_on_cuda() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(1024, 1024), nn.Linear(1024, 16)).to("cuda", torch.bfloat16).eval()
    x = torch.randn(8, 1024, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        expected = model(x)
    quantized, info = Quantizer().quantize(model, method="int4_weight_only", example_input=x)
    with torch.no_grad():
        assert cosine(quantized(x).float(), expected.float()) > 0.99


@pytest.mark.slow
def test_a_quantized_artifact_reopens_in_a_process_that_has_not_imported_torchao(tmp_path: Path) -> None:
    """torchao's tensor types are safe for weights-only loading once torchao is imported: the reopening imports
    the recorded steps' backends before it reads the weights (a timing or memory process starts with none)."""
    import subprocess
    import sys

    model, x = mlp(), torch.randn(4, 64)
    quantized, _ = Quantizer().quantize(model, method="int8_weight_only", example_input=x, skip_head=False)
    model_opt.save(quantized, tmp_path / "q.pt")
    torch.save(x, tmp_path / "x.pt")
    code = ("import sys, torch, model_opt\n"
            "from torch import nn\n"
            "assert 'torchao' not in sys.modules\n"
            "torch.manual_seed(0)\n"
            "base = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10))\n"
            "m = model_opt.load(sys.argv[1], model=base.eval())\n"
            "torch.save(m(torch.load(sys.argv[2])), sys.argv[3])\n")
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path / "q.pt"), str(tmp_path / "x.pt"),
                           str(tmp_path / "y.pt")], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-1500:]
    with torch.no_grad():
        torch.testing.assert_close(torch.load(tmp_path / "y.pt"), quantized(x), rtol=0, atol=0)
