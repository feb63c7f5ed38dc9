"""Causal language models as a family: a GPT-2 or Llama folder loads with its LM head, transformers' Conv1D is
handled as the Linear it is, the built-in evaluation (no test script, a folder of text) gives perplexity,
agreement and decode tokens/s, and results reopen in a fresh process with no trust flag.

The models are tiny and built from configs; the GPT-2 one is trained for a few seconds on the test text, so that
its perplexity means something (lower on its own text than on the same words shuffled)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")


@pytest.fixture(autouse=True)
def _short_windows(short_lm_windows) -> None:
    """Every test here evaluates with short windows (the session's tiny models)."""


def test_the_folder_loads_with_its_lm_head_and_recommend_plans_weight_only(cli, lm) -> None:
    import model_opt

    model = model_opt.load(lm["llama"])
    assert type(model).__name__ == "LlamaForCausalLM" and callable(model.generate)
    result = cli("recommend", lm["llama"], "--test-dataset", lm["text"])
    assert result.exit_code == 0, result.stderr
    assert result.stdout.startswith(f"{lm['llama']}: causal-lm (LlamaForCausalLM, 2 decoder layers, vocabulary "
                                    "30522)")
    plan = [line for line in result.stdout.splitlines() if line.startswith("- ")]
    # GGUF in llama.cpp first where its runtime is installed; else int4 in OpenVINO, and the GGUF lines (last) say
    # what to install
    gguf = [line for line in plan if line.startswith("- quantize llama-cpp:gguf")]
    nncf = next(line for line in plan if line.startswith("- quantize nncf:weight_only"))
    if importlib.util.find_spec("llama_cpp") is not None:
        assert plan[:3] == gguf and plan[3] == nncf, plan
        first = result.stdout.splitlines()[result.stdout.splitlines().index(plan[0]) + 1]
        assert "--quant-opt type=q4_k_m" in first, first  # (the k-quant mix: Ollama's default)
    else:
        assert plan[0] == nncf and plan[-3:] == gguf, plan
        assert all('missing llama_cpp: pip install "model-opt[llama-cpp]"' in line for line in gguf), gguf
    command = result.stdout.splitlines()[result.stdout.splitlines().index(nncf) + 1]
    assert "--quant-opt runtime=openvino" in command and "--test-script" not in command  # built-in evaluation
    int8 = next(line for line in plan if line.startswith("- quantize torchao:int8_weight_only: decode reads every "
                                                         "weight once per token"))
    from model_opt.device import device_profile

    if device_profile().has("int8 dot products"):  # fast here: after OpenVINO; else after the fast ones, slow
        assert plan.index(int8) == plan.index(nncf) + 1
    else:
        assert "[slow on this CPU" in int8 and plan.index(int8) > plan.index(next(p for p in plan if "slow" not in p))


@pytest.mark.slow
def test_builtin_evaluation_is_consistent(lm) -> None:
    """Perplexity of the trained model on its own text is lower than on the same words shuffled; the float model
    agrees with itself on every next token; decode and prefill are timed."""
    import importlib

    import model_opt
    from model_opt.builtin import lm_eval

    importlib.reload(lm_eval)  # the window settings of this test
    model = model_opt.load(lm["gpt2"])
    own = lm_eval.evaluate(model, str(lm["text"]), str(lm["gpt2"]))
    shuffled = lm_eval.evaluate(model, str(lm["shuffled"]), str(lm["gpt2"]))
    assert list(own)[0] == "perplexity" and 1.0 < own["perplexity"] < shuffled["perplexity"]
    assert own["next_token_agreement"] == 1.0
    assert own["decode_tokens_per_s"] > 0 and own["prefill_ms"] > 0
    # each token's time split between the model's forward and the rest of the decode loop: the two add up
    runtime, outside = own["decode_runtime_ms_per_token"], own["decode_overhead_ms_per_token"]
    assert runtime > 0 and outside > 0
    assert runtime + outside == pytest.approx(1000 / own["decode_tokens_per_s"], rel=1e-6)
    assert not model._forward_pre_hooks and not model._forward_hooks  # the timing's hooks are gone


def test_a_module_with_its_own_runtime_counts_the_time_inside_it() -> None:
    """A module that decodes in a runtime of its own reports the seconds spent in it (``runtime_seconds``); the
    split takes them as they are, and the rest of each step is the loop's own."""
    import time

    import torch
    from model_opt.builtin import lm_eval

    class Counted(torch.nn.Module):
        runtime_seconds = 0.0

        def generate(self, input_ids, max_new_tokens, stopping_criteria, **_):
            ids = input_ids
            for _ in range(max_new_tokens):
                started = time.perf_counter()
                time.sleep(0.010)  # the runtime's part
                self.runtime_seconds += time.perf_counter() - started
                time.sleep(0.002)  # the loop's own part
                ids = torch.cat([ids, ids[:, -1:]], 1)
                stopping_criteria(ids, None)
            return ids

    decode = lm_eval._time_decode(Counted(), torch.zeros(1, 4, dtype=torch.long))
    assert decode.runtime_ms >= 9.9 and decode.overhead_ms >= 1.9  # (a sleep never ends early)
    assert decode.runtime_ms > decode.overhead_ms


@pytest.mark.slow
def test_decode_is_timed_in_a_process_of_each_model_own(lm, tmp_path: Path) -> None:
    """Each candidate decodes in its own process, opened from its file: one rate per candidate (the median of
    the rounds); a candidate that does not open is a one-line error naming the timing process."""
    import torch
    from model_opt.errors import ModelOptError
    from model_opt.timing import Deployed, decode_deployed

    example = {"input_ids": torch.arange(1, 17)[None]}
    rates = decode_deployed({"a": Deployed(str(lm["llama"])), "b": Deployed(str(lm["gpt2"]))}, example, rounds=2)
    assert set(rates) == {"a", "b"} and all(0 < rate.tokens_per_s < float("inf") for rate in rates.values()), rates
    assert all(rate.runtime_ms > 0 and rate.overhead_ms > 0 for rate in rates.values()), rates
    (tmp_path / "broken.pt").write_bytes(b"not a model")
    with pytest.raises(ModelOptError, match="the timing process failed"):
        decode_deployed({"broken": Deployed(str(tmp_path / "broken.pt"))}, example)


@pytest.mark.slow
@pytest.mark.parametrize(("name", "backend", "method", "extra", "tolerance"), [
    ("gpt2", "torchao", "int8_dynamic", [], 0.05),
    ("llama", "torchao", "int8_weight_only", ["--compile"], 0.05),  # decode timed compiled (static cache)
    ("gpt2", "neural-compressor", "weight_only", ["--quant-opt", "algorithm=gptq"], 0.25),  # int4, GPTQ on the text
    ("llama", "neural-compressor", "weight_only", ["--quant-opt", "algorithm=awq"], 0.25),  # int4, AWQ on the text
    ("llama", "nncf", "weight_only", [], 0.05),  # int8 weights, embeddings too
    ("gpt2", "nncf", "weight_only", ["--quant-opt", "mode=int4_sym", "--quant-opt", "group_size=32"], 0.25),
    ("llama", "nncf", "int8_static", [], 0.05),  # int8 weights and activations, SmoothQuant, OpenVINO, KV cache
    ("llama", "nncf", "weight_only", ["--quant-opt", "runtime=openvino", "--quant-opt", "mode=int4_sym",
                                      "--quant-opt", "group_size=32"], 0.25),  # OpenVINO, KV cache as inputs
])
def test_quantizing_a_causal_lm_without_a_test_script_reopens(cli, lm, tmp_path: Path, name: str, backend: str,
                                                              method: str, extra: list[str], tolerance: float) -> None:
    out = tmp_path / f"{name}-{method}"
    result = cli("optimize", lm[name], "--test-dataset", lm["text"], "--quantize", "--quant-backend", backend,
                 "--quant-method", method, *extra, "--output", f"{out}/", "--json", "-q")
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    before, after = report["before"], report["after"]
    assert before["primary_metric"] == "perplexity" and not report["higher_is_better"]
    decode = "decode_tokens_per_s_compiled" if "--compile" in extra else "decode_tokens_per_s"
    suffix = "_compiled" if "--compile" in extra else ""
    assert set(before["metrics"]) == set(after["metrics"]) == {
        "perplexity", "next_token_agreement", "prefill_ms", decode, f"decode_runtime_ms_per_token{suffix}",
        f"decode_overhead_ms_per_token{suffix}"}
    assert after["metrics"]["perplexity"] == pytest.approx(before["metrics"]["perplexity"], rel=tolerance)
    # peak memory: each model opened and decoding in its own process (runtime included)
    assert before["peak_memory_bytes"], report["warnings"]
    assert before["peak_memory_bytes"] > 2**20 * 50 and after["peak_memory_bytes"] > 2**20 * 50
    assert report["summary"]["peak_memory_ratio"] == pytest.approx(after["peak_memory_bytes"]
                                                                   / before["peak_memory_bytes"])
    assert "greedy decode" in report["memory_workload"]
    # decode of a result in another runtime than torch: each model timed in its own process, as deployed
    other_runtime = after["latency"]["runtime"] not in ("eager", "compiled")
    assert (report["decode_workload"] is not None) is other_runtime, report["decode_workload"]
    info = report["steps"][0]["info"]
    if backend == "torchao" and name == "gpt2":  # Conv1D as Linear: every block projection, not only lm_head
        assert "transformer.h.0.attn.c_attn" in info["quantized"], info
    if backend == "neural-compressor":  # every block projection packed; AWQ scaled some layers' inputs
        assert info["packed_layers"] >= 8 and (info["input_scaled_layers"] > 0) is ("algorithm=awq" in extra), info
    if backend == "nncf":  # the report warns of no speed-up only where the runtime decompresses at every call
        openvino = "runtime=openvino" in extra or method == "int8_static"
        assert any("does not reduce latency" in w for w in report["warnings"]) is not openvino, report["warnings"]
        assert after["latency"]["runtime"] == ("openvino" if openvino else "eager")
    if method == "weight_only" and backend == "nncf":  # int8 (or int4) weights, the embeddings included
        assert after["size_bytes"] < 0.35 * before["size_bytes"], (after["size_bytes"], before["size_bytes"])
    if "runtime=openvino" in extra or method == "int8_static":  # ports named as optimum-intel names them
        import openvino as ov

        ir = ov.Core().read_model(str(out / "openvino_model.xml"))
        cache = [f"{i}.{kind}" for i in range(2) for kind in ("key", "value")]
        assert [p.get_any_name() for p in ir.inputs] == ["input_ids", "attention_mask",
                                                         *[f"past_key_values.{c}" for c in cache]]
        assert [p.get_any_name() for p in ir.outputs] == ["logits", *[f"present.{c}" for c in cache]]
        assert all(p.get_partial_shape()[0].is_dynamic for p in ir.inputs)  # any batch
    if method == "int8_static":  # SmoothQuant, then int8 weights and activations, in OpenVINO with the KV cache
        assert info["smooth_quant_alpha"] == 0.95 and info["model_type"] == "transformer", info
        assert info["fake_quantize_ops"] > 0 and info["kv_cache"]["layers"] == 2, info
        assert after["size_bytes"] < before["size_bytes"]
    assert {"config.json", "model_opt.json", "vocab.txt"} <= {p.name for p in out.iterdir()}
    # reopened in a fresh process with no trust flag, it scores what the report says
    code = ("import sys, model_opt\n"
            "from model_opt.builtin import lm_eval\n"
            "m = model_opt.load(sys.argv[1])\n"
            "print(type(m).__name__, lm_eval.evaluate(m, sys.argv[2], sys.argv[3])['perplexity'])\n")
    env = {k: v for k, v in os.environ.items() if k.startswith("MODEL_OPT_LM_") or k == "PYTHONPATH"}
    proc = subprocess.run([sys.executable, "-c", code, str(out), str(lm["text"]), str(lm[name])],
                          capture_output=True, text=True, env={**env, "HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    kind, perplexity = proc.stdout.split()
    assert kind.endswith("CausalLM") or kind == "GPT2LMHeadModel"
    assert float(perplexity) == pytest.approx(after["metrics"]["perplexity"], rel=1e-3)  # int8 dynamic: ~1e-4


@pytest.mark.slow
def test_gptq_on_a_model_built_from_a_config_stays_offline() -> None:
    """INC looks GPTQ's model path up on the Hub when it is not a folder: "" for a model built from a config."""
    import torch
    from model_opt.techniques import Quantizer
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                         num_attention_heads=4, num_key_value_heads=2, vocab_size=500)).eval()
    ids = [{"input_ids": torch.randint(0, 500, (1, 32))} for _ in range(2)]
    with torch.no_grad():
        expected = model(**ids[0]).logits
    quantized, info = Quantizer().quantize(model, method="weight_only", backend="neural-compressor",
                                           algorithm="gptq", example_input=ids[0], calibration_data=ids)
    assert info["packed_layers"] == 7
    with torch.no_grad():
        torch.testing.assert_close(quantized(**ids[0]).logits, expected, atol=0.05, rtol=0)


@pytest.mark.parametrize(("blocks", "example", "message"), [
    (False, "tensor", "algorithm=awq works block by block, and INC finds the blocks as the model's first "
                      "nn.ModuleList (as in Hugging Face transformers); this model has none"),
    (True, "tuple", "algorithm=awq traces the model on one input tensor, and the example input is a tuple"),
    (True, "dict", "algorithm=awq traces the model on one input tensor, and the example input is a dict without "
                   "input_ids"),
])
def test_awq_refuses_what_inc_cannot_trace(blocks: bool, example: str, message: str) -> None:
    import torch
    from model_opt.errors import TechniqueError
    from model_opt.techniques import Quantizer
    from torch import nn

    layers = [nn.Linear(16, 16), nn.Linear(16, 16)]
    model = nn.Sequential(nn.ModuleList(layers) if blocks else nn.Sequential(*layers))
    x = torch.randn(2, 16)
    given = {"tensor": x, "tuple": (x, x), "dict": {"pixel_values": x}}[example]
    with pytest.raises(TechniqueError) as caught:
        Quantizer().quantize(model, method="weight_only", backend="neural-compressor", algorithm="awq",
                             example_input=given, calibration_data=[given])
    assert caught.value.problem == message
    assert "use algorithm=gptq or rtn" in str(caught.value)


@pytest.mark.slow
def test_autotune_for_decode_tokens_per_second(cli, lm, tmp_path: Path) -> None:
    """--objective tokens-per-second ranks candidates by decode tokens/s over the float model's (built-in
    evaluation), the decode compiled where the candidate runs compiled."""
    result = cli("autotune", lm["llama"], "--test-dataset", lm["text"], "--objective", "tokens-per-second",
                 "--backends", "torchao", "--include-slow", "--trials", "1", "--max-accuracy-drop", "20",
                 "--output", f"{tmp_path / 'tuned'}/", "--json", "-q")
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["summary"]["objective"] == "tokens-per-second"
    best = report["best"]
    assert best["steps"][0]["backend"] == "torchao" and best["speedup"] > 0 and best["remeasured_speedup"] > 0
    assert report["baseline"]["decode_tokens_per_s"] > 0
    assert (tmp_path / "tuned" / "model_opt.json").exists()


def test_a_model_that_is_not_a_causal_lm_still_needs_a_test_script(cli, digits) -> None:
    result = cli("optimize", digits.model, "--test-dataset", digits.dataset, "--prune")
    assert result.exit_code == 2
    assert "--test-script is required for this model" in result.stderr


def test_the_shared_greedy_loop_feeds_one_token_per_step_and_stops_when_asked() -> None:
    """OpenVINO and llama.cpp results decode through one loop: the prompt first (the cache emptied), then each new
    token alone; the stopping criteria see the ids so far and that token's logits, and end the loop."""
    import numpy as np
    import torch
    from model_opt.decoding import greedy

    fed: list[tuple[list[int], bool]] = []
    buffer = np.zeros(16, dtype=np.float32)  # (the runtime's own buffer, overwritten at every step)

    def step(tokens: list[int], start: bool) -> np.ndarray:
        fed.append((tokens, start))
        buffer[:] = 0
        buffer[(tokens[-1] + 1) % 16] = 1.0  # the next token: the last one plus one
        return buffer

    seen = []

    def stop(ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        seen.append((ids.tolist(), int(scores.argmax())))
        return torch.tensor([ids.shape[1] == 6])

    out = greedy(step, torch.tensor([[3, 4, 5]]), max_new_tokens=8, stopping_criteria=stop)
    assert out.tolist() == [[3, 4, 5, 6, 7, 8]]
    assert fed == [([3, 4, 5], True), ([6], False), ([7], False)]
    assert seen == [([[3, 4, 5, 6]], 6), ([[3, 4, 5, 6, 7]], 7), ([[3, 4, 5, 6, 7, 8]], 8)]
    assert greedy(step, torch.tensor([[1]]), max_new_tokens=3).tolist() == [[1, 2, 3, 4]]

    class Stamp:  # (a criterion that only notes the time, as model-opt's evaluation's: ticked, given no tensors)
        def tick(self) -> None:
            seen.append("tick")

        def __call__(self, ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
            seen.append("called")
            return torch.tensor([False])

    seen.clear()
    assert greedy(step, torch.tensor([[1]]), max_new_tokens=3, stopping_criteria=[Stamp()]).tolist() == [[1, 2, 3, 4]]
    assert seen == ["tick"] * 3
    seen.clear()
    from transformers import StoppingCriteriaList

    both = StoppingCriteriaList([Stamp(), stop])
    assert greedy(step, torch.tensor([[1]]), max_new_tokens=8, stopping_criteria=both).tolist() == [
        [1, 2, 3, 4, 5, 6]]  # (one criterion without a tick: all are called as transformers calls them)
    assert "tick" not in seen and seen.count("called") == 5
