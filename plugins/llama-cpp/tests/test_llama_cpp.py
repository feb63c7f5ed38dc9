"""The llama-cpp plugin: a causal LM written as GGUF with the gguf package, quantized by llama.cpp, run in llama.cpp
(llama-cpp-python). The float32 file gives the torch model's logits (the conversion is right, Llama's rotary
order included); the quantized result keeps the perplexity; the folder's model.gguf opens in llama.cpp alone and
reopens in a fresh process with the report's perplexity; llama.cpp tokenizes text as transformers does."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

llama_cpp = pytest.importorskip("llama_cpp")
pytest.importorskip("gguf")

from model_opt.errors import ModelLoadError, TechniqueError, UsageError  # noqa: E402
from model_opt.techniques import Quantizer  # noqa: E402


def _open_alone(path: Path) -> object:
    return llama_cpp.Llama(model_path=str(path), n_ctx=256, logits_all=True, verbose=False)


def _hf(folder: Path) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder).eval()


@pytest.mark.parametrize("name", ["llama", pytest.param("gpt2", marks=pytest.mark.slow)])  # (gpt2: trained)
def test_float32_gguf_gives_the_torch_models_logits(lm, name: str) -> None:
    model = _hf(lm[name])
    ids = torch.arange(1000, 1040)[None]
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    result, info = Quantizer().quantize(model, method="gguf", backend="llama-cpp", type="f32")
    assert info["architecture"] == name and info["tokenizer"] == "bert (default)"
    with torch.no_grad():
        got = result(input_ids=ids).logits
    torch.testing.assert_close(got, expected, atol=2e-3, rtol=1e-3)
    # the file is read, not memory-mapped: llama.cpp repacks 4-bit weights, and a mapping would keep the file's pages
    # beside the repacked copy (a reopened Q4_0 model held its weights twice)
    assert str(result._path) not in Path("/proc/self/maps").read_text()
    # the greedy decode with llama.cpp's KV cache follows the float model's
    with torch.no_grad():
        reference = model.generate(ids[:, :8], max_new_tokens=8, do_sample=False, pad_token_id=0)
    assert result.generate(ids[:, :8], max_new_tokens=8).tolist() == reference.tolist()


def test_byte_level_bpe_tokenizes_as_transformers_does(lm, tmp_path: Path) -> None:
    """A GPT-2-style byte-level BPE tokenizer (trained here on the test text) is written with its merges and
    GPT-2's pre-tokenizer: llama.cpp tokenizes text into the same ids as transformers."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    text = "the cat sat on the mat and the dog sat on the log while the bird sang in the tree. " * 20
    tokenizer.train_from_iterator([text], trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"],
                                                              initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    folder = tmp_path / "bpe-gpt2"
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|endoftext|>", bos_token="<|endoftext|>")
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_embd=64, n_layer=1, n_head=2, n_positions=128,
                                       vocab_size=len(fast))).eval()
    model.save_pretrained(folder)
    fast.save_pretrained(folder)
    result, info = Quantizer().quantize(_hf(folder), method="gguf", backend="llama-cpp", type="f32")
    assert info["tokenizer"] == "gpt2 (gpt-2)"
    text = "the dog sat on the log, while 3 birds sang!"
    alone = result._llm
    assert alone.tokenize(text.encode(), add_bos=False, special=False) == fast(text)["input_ids"]


@pytest.mark.slow
def test_q8_0_folder_keeps_perplexity_opens_alone_and_reopens_in_a_fresh_process(cli, lm, tmp_path: Path) -> None:
    out = tmp_path / "q8"
    result = cli("optimize", lm["gpt2"], "--test-dataset", lm["text"], "--quantize", "--quant-backend", "llama-cpp",
                 "--quant-method", "gguf", "--quant-opt", "type=q8_0", "--output", f"{out}/", "--json", "-q")
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    before, after = report["before"]["metrics"], report["after"]["metrics"]
    assert after["perplexity"] == pytest.approx(before["perplexity"], rel=0.01)
    assert after["next_token_agreement"] > 0.95 and after["decode_tokens_per_s"] > 0
    assert "own process" in report["decode_workload"]  # (llama.cpp and torch apart, as each is deployed)
    assert report["after"]["latency"]["runtime"] == "llama.cpp"
    assert report["runtime_latency"]["runtime"] == "llama.cpp"  # the float32 GGUF, timed in the same rounds
    assert report["runtime_decode"]["runtime"] == "llama.cpp"  # ... and decoding in the same rounds
    summary = report["summary"]
    assert summary["speedup"] == pytest.approx(summary["speedup_runtime"] * summary["speedup_technique"])
    assert report["before"]["peak_memory_bytes"] and report["after"]["peak_memory_bytes"]
    info = report["steps"][0]["info"]
    assert info["type"] == "q8_0" and info["file_bytes"] < 0.4 * report["before"]["size_bytes"]
    gguf_file = out / "model.gguf"
    assert {"model.gguf", "model_opt.json", "config.json", "vocab.txt"} <= {p.name for p in out.iterdir()}
    # the file as it is, in llama.cpp alone: the result's logits
    ids = list(range(1000, 1032))
    alone = _open_alone(gguf_file)
    alone.eval(ids)
    import model_opt

    reopened = model_opt.load(out)
    with torch.no_grad():
        logits = reopened(input_ids=torch.tensor([ids])).logits[0]
    torch.testing.assert_close(logits, torch.from_numpy(alone.scores[:32].copy()), atol=1e-4, rtol=1e-4)
    # reopened in a fresh process with no trust flag, it scores what the report says
    code = ("import sys, model_opt\n"
            "from model_opt.builtin import lm_eval\n"
            "m = model_opt.load(sys.argv[1])\n"
            "print(type(m).__name__, lm_eval.evaluate(m, sys.argv[2], sys.argv[3])['perplexity'])\n")
    env = {k: v for k, v in os.environ.items() if k.startswith("MODEL_OPT_LM_") or k == "PYTHONPATH"}
    proc = subprocess.run([sys.executable, "-c", code, str(out), str(lm["text"]), str(lm["gpt2"])],
                          capture_output=True, text=True, env={**env, "HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    kind, perplexity = proc.stdout.split()
    assert kind == "GGUFModule" and float(perplexity) == pytest.approx(after["perplexity"], rel=1e-4)
    # the .gguf as the model (what a user got from elsewhere) and exported again as it is
    assert type(model_opt.load(gguf_file)).__name__ == "GGUFModule"
    exported = cli("export", out, "--format", "gguf", "--output", str(tmp_path / "again.gguf"))
    assert exported.exit_code == 0, exported.stderr
    assert (tmp_path / "again.gguf").read_bytes() == gguf_file.read_bytes()


@pytest.mark.slow
def test_q4_0_of_a_llama_and_export_of_the_float_model(cli, lm, tmp_path: Path) -> None:
    result = cli("optimize", lm["llama"], "--test-dataset", lm["text"], "--quantize", "--quant-backend", "llama-cpp",
                 "--quant-method", "gguf", "--output", f"{tmp_path / 'q4'}/", "--json", "-q")
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["steps"][0]["options"]["type"] == "q4_0"
    assert report["after"]["size_bytes"] < 0.25 * report["before"]["size_bytes"]
    # export --format gguf of the torch model: float16 GGUF, opened by llama.cpp as it is
    exported = cli("export", lm["llama"], "--format", "gguf", "--output", f"{tmp_path}/")
    assert exported.exit_code == 0, exported.stderr
    alone = _open_alone(tmp_path / "tiny-llama.gguf")
    alone.eval(list(range(1000, 1016)))
    model = _hf(lm["llama"])
    with torch.no_grad():
        expected = model(input_ids=torch.arange(1000, 1016)[None]).logits[0]
    torch.testing.assert_close(torch.from_numpy(alone.scores[:16].copy()), expected, atol=2e-2, rtol=1e-2)


def test_an_importance_matrix_rounds_the_loud_channels_more_carefully(lm) -> None:
    """llama.cpp's quantizer weights each input channel's rounding error by its mean square over the calibration
    tokens: where a few channels are loud (as in trained LMs), q4_0 with the matrix stays closer to float. Without
    calibration data ``auto`` makes none; ``on`` then asks for it in one line."""
    model = _hf(lm["llama"])
    torch.manual_seed(0)  # (the session's tiny Llama is not seeded: its weights drawn again, seeded)
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.copy_(torch.ones_like(param) if "norm" in name else torch.randn_like(param) * 0.02)
        for layer in model.model.layers:
            layer.input_layernorm.weight[[3, 17, 29, 50]] = 60.0
            layer.post_attention_layernorm.weight[[5, 22, 40, 61]] = 60.0
    batches = [{"input_ids": torch.randint(1000, 2000, (1, 64))} for _ in range(4)]
    ids = torch.randint(1000, 2000, (1, 64))
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    errors, said = {}, {}
    for choice in ("off", "on"):
        result, info = Quantizer().quantize(model, method="gguf", backend="llama-cpp", type="q4_0", imatrix=choice,
                                            calibration_data=batches)
        errors[choice] = float((result(input_ids=ids).logits - expected).square().mean())
        said[choice] = info["imatrix"]
    assert said == {"off": "none", "on": "15 matrices from 256 calibration tokens"}  # 2 blocks x 7, and the head
    assert errors["on"] < 0.85 * errors["off"], errors
    assert Quantizer().quantize(model, method="gguf", backend="llama-cpp", type="q4_0")[1]["imatrix"] == "none"
    with pytest.raises(TechniqueError, match="needs calibration data"):
        Quantizer().quantize(model, method="gguf", backend="llama-cpp", type="q4_0", imatrix="on")


def test_refusals(lm, tmp_path: Path) -> None:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    qwen = Qwen2ForCausalLM(Qwen2Config(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                        num_attention_heads=2, num_key_value_heads=1, vocab_size=128))
    with pytest.raises(TechniqueError) as caught:
        Quantizer().quantize(qwen, method="gguf", backend="llama-cpp", type="f32")
    assert caught.value.problem == ("model-opt writes GGUF for the Llama and GPT-2 architectures, and this model is "
                                    "a Qwen2ForCausalLM")
    with pytest.raises(UsageError, match="'q4_k'"):
        Quantizer().quantize(_hf(lm["llama"]), method="gguf", backend="llama-cpp", type="q4_k")
    damaged = tmp_path / "damaged.gguf"
    damaged.write_bytes(b"GGUF" + b"\0" * 64)
    import model_opt

    with pytest.raises(ModelLoadError, match=r"^damaged.gguf is not a GGUF file model-opt can read"):
        model_opt.load(damaged)


@pytest.mark.slow
def test_autotune_for_decode_tokens_per_second_searches_the_gguf_types(cli, lm, tmp_path: Path) -> None:
    result = cli("autotune", lm["gpt2"], "--test-dataset", lm["text"], "--objective", "tokens-per-second",
                 "--backends", "llama-cpp", "--trials", "2", "--max-accuracy-drop", "0.5",
                 "--output", f"{tmp_path / 'tuned'}/", "--json", "-q")
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    best = report["best"]
    assert best["steps"][0]["backend"] == "llama-cpp" and best["steps"][0]["options"]["type"] in ("q8_0", "q4_k_m",
                                                                                                 "q4_0")
    assert best["speedup"] > 0 and best["remeasured_speedup"] > 0
    assert (tmp_path / "tuned" / "model.gguf").is_file()
