"""The device profile: read from the machine, named in every report, and used to tell which techniques are fast
here (techniques declare what they need; the core checks it): recommend puts the slow ones after the fast ones
and says why, autotune leaves them out unless asked, the report warns."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import plugin_module
from model_opt.device import DeviceProfile, device_profile, parse_cpuinfo, slow_here
from model_opt.hookspecs import hookimpl
from model_opt.plugins import PluginManager
from model_opt.registry import Recommended, Technique

AVX2 = ("AMD EPYC 7B13", ("avx2",), 2, 24 * 2**30)
VNNI = ("Intel(R) Xeon(R) Platinum 8480+", ("avx2", "avx512f", "avx512_vnni", "amx_int8", "amx_bf16"), 8,
        64 * 2**30)


@pytest.fixture(params=["avx2", "vnni"])
def cpu(request, monkeypatch) -> str:
    """This process's CPU, as either kind of machine."""
    import model_opt.device

    monkeypatch.setattr(model_opt.device, "_cpu", lambda: AVX2 if request.param == "avx2" else VNNI)
    return request.param


def test_cpuinfo_is_read_for_the_instruction_sets_that_matter() -> None:
    model, isa = parse_cpuinfo("processor : 0\nmodel name : AMD EPYC 7B13\nflags : fpu sse avx avx2 fma\n"
                               "processor : 1\nmodel name : AMD EPYC 7B13\nflags : fpu sse avx avx2 fma\n")
    assert (model, isa) == ("AMD EPYC 7B13", ("avx2",))
    model, _ = parse_cpuinfo("processor : 0\nvendor_id : AuthenticAMD\ncpu family : 23\nmodel : 1\n"
                             "model name : AMD EPYC\nflags : avx2\nprocessor : 1\ncpu family : 25\n")
    assert model == "AMD EPYC (family 23, model 1)"  # (a generation the brand alone does not name)
    _, isa = parse_cpuinfo("flags : avx2 avx512f avx512_vnni avx512_bf16 amx_int8 amx_bf16\n")
    assert isa == ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_int8", "amx_bf16")
    here = device_profile()
    assert here.cores >= 1 and here.cpu and here.describe().startswith(here.cpu)


def test_a_profile_answers_for_each_capability() -> None:
    avx2, vnni = DeviceProfile(*AVX2), DeviceProfile(*VNNI)
    assert not avx2.has("int8 dot products") and vnni.has("int8 dot products")
    assert not avx2.has("bf16") and vnni.has("bf16")
    assert avx2.describe() == "AMD EPYC 7B13, 2 cores, 24.0 GiB; AVX2 (no VNNI, no AMX)"
    assert "AVX-512 VNNI" in vnni.describe() and "no " not in vnni.describe()
    gpu = DeviceProfile(*AVX2, gpus=(("NVIDIA A10G", "8.6"),))
    assert gpu.has("cuda") and not gpu.has("cuda 8.9") and gpu.has("int8 dot products", "cuda")
    assert "NVIDIA A10G (compute capability 8.6)" in gpu.describe("cuda")
    assert slow_here({"int8 dot products": "int8 matmuls"}, "cpu", avx2) == (
        "slow on this CPU: it needs int8 dot-product instructions (AVX-512 VNNI, AVX-VNNI or AMX; any CUDA GPU), "
        "which this CPU lacks (int8 matmuls)")
    assert slow_here({"int8 dot products": "x"}, "cpu", vnni) is None
    with pytest.raises(ValueError, match="fast_needs names 'warp drive'"):
        Technique("quantize", "acme", "q", "q", fast_needs={"warp drive": "x"})


def _manager() -> PluginManager:
    @hookimpl
    def register_techniques(register):
        register(Technique("quantize", "acme", "int8", "int8 matmuls", search_space={},
                           fast_needs={"int8 dot products": "int8 matmuls run slower than float without them"},
                           recommended=(Recommended("transformer", "int8 GEMMs", rank=1),)))
        register(Technique("prune", "acme", "channels", "fewer channels", search_space={},
                           recommended=(Recommended("transformer", "smaller matmuls", rank=2),)))

    manager = PluginManager(load_entry_points=False)
    manager.register(plugin_module("acme", register_techniques=register_techniques), "acme")
    return manager


def test_recommend_puts_what_is_fast_here_first_and_says_why_the_rest_is_slow(cpu: str) -> None:
    from model_opt.recommend import first_fast_here, recommend

    _, _, recommendations = recommend(torch.nn.Sequential(torch.nn.Linear(4, 4)), "cpu", _manager())
    order = [(r.technique.method, bool(r.slow)) for r in recommendations]
    if cpu == "avx2":
        assert order == [("channels", False), ("int8", True)]
        assert recommendations[1].slow.startswith("slow on this CPU: it needs int8 dot-product instructions")
    else:
        assert order == [("int8", False), ("channels", False)]
    assert first_fast_here(recommendations).technique.method == ("channels" if cpu == "avx2" else "int8")


def test_autotune_searches_what_is_slow_here_only_when_asked(cpu: str) -> None:
    from model_opt.autotune import searchable

    manager = _manager()
    space = searchable(manager, "cpu", True, None, "transformer")
    assert ("quantize" in space) is (cpu == "vnni") and "prune" in space
    assert "quantize" in searchable(manager, "cpu", True, None, "transformer", include_slow=True)


def test_the_report_names_the_machine_and_warns_of_a_technique_slow_here(cpu: str) -> None:
    from model_opt.report import Measurement, Report
    from model_opt.speed_advice import speed_warnings

    technique = _manager().registry.find("quantize", "acme", "int8")
    report = Report("m.pt", "cpu", 2, True, Measurement({"accuracy": 1.0}, "accuracy", 10, 10, 40),
                    profile=device_profile())
    warnings = speed_warnings(report, [(technique, {})])
    assert any("acme int8 is slow on this CPU" in w for w in warnings) is (cpu == "avx2")
    assert report.render().splitlines()[1].startswith("  device: ")
    data = json.loads(report.to_json())["device_profile"]
    assert data["cpu"] == (AVX2 if cpu == "avx2" else VNNI)[0]
    assert data["int8_dot_products"] is (cpu == "vnni")


def test_recommend_prints_the_device_and_marks_torchao_int8_by_this_cpu(cli, lm, cpu: str) -> None:
    pytest.importorskip("torchao")
    result = cli("recommend", lm["llama"], "--test-dataset", lm["text"])
    assert result.exit_code == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[1].startswith("device: cpu — ")
    int8 = next(line for line in lines if line.startswith("- quantize torchao:int8_weight_only"))
    assert ("[slow on this CPU: it needs int8 dot-product instructions" in int8) is (cpu == "avx2")


def test_autotune_says_when_everything_it_could_search_is_slow_here(cli, lm, monkeypatch) -> None:
    """Only torchao asked for, on a CPU without int8 dot products: the error names the slow techniques and
    --include-slow, not a missing plugin."""
    pytest.importorskip("torchao")
    import model_opt.device

    monkeypatch.setattr(model_opt.device, "_cpu", lambda: AVX2)
    result = cli("autotune", lm["llama"], "--test-dataset", lm["text"], "--backends", "torchao", "--trials", "1",
                 "--max-accuracy-drop", "20")
    assert result.exit_code == 2
    assert "every technique the tuner could search here is slow on this device: torchao int8" in result.stderr
    assert "rerun with --include-slow" in result.stderr and "not installed" not in result.stderr
