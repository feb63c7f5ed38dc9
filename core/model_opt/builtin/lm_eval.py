"""model-opt's built-in evaluation of causal language models, used when MODEL is a causal LM (a Hugging Face
folder whose architecture ends in ForCausalLM/LMHeadModel) and no ``--test-script`` is given; the dataset is
a folder of ``.txt`` files, tokenized with the model folder's tokenizer.

Metrics, perplexity first (the primary metric, lower is better):

- ``perplexity``: exp of the mean next-token loss over fixed windows of the text (``MODEL_OPT_LM_WINDOW``
  tokens each, at most ``MODEL_OPT_LM_WINDOWS`` windows);
- ``next_token_agreement``: how often the model's top-1 next token is the float model's;
- ``prefill_ms``: one forward pass over a prompt of ``MODEL_OPT_LM_PROMPT`` tokens (batch 1);
- ``decode_tokens_per_s``: greedy decoding of ``MODEL_OPT_LM_GENERATE`` tokens after that prompt with a static
  KV cache (``cache_implementation="static"``), one token per step, batch 1; under ``--compile``
  ``decode_tokens_per_s_compiled``, the same with the model's forward compiled (torch.compile). The static
  cache is what makes compiled decoding pay: its shapes do not change from one step to the next, so there is
  one graph for the prompt and one for every decode step, while a growing (dynamic) cache changes the shapes
  at every step (recompilations, then a dynamic-shape graph).

The report's size row gives the weights' memory; ``optimize`` adds each model's peak memory, opened and decoding
in a process of its own (:mod:`model_opt.memory`).

A model that cannot generate (an OpenVINO module other than nncf weight_only's causal LM with its KV
cache) reports no decode figure.
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path
from typing import Any

import torch

HIGHER_IS_BETTER = False
WINDOW = int(os.environ.get("MODEL_OPT_LM_WINDOW", "128"))
WINDOWS = int(os.environ.get("MODEL_OPT_LM_WINDOWS", "16"))
PROMPT = int(os.environ.get("MODEL_OPT_LM_PROMPT", "32"))
GENERATE = int(os.environ.get("MODEL_OPT_LM_GENERATE", "32"))
_CACHE: dict[str, Any] = {}


def settings() -> dict[str, int]:
    """The fixed lengths the figures are measured with (stated in the report)."""
    return {"window": WINDOW, "windows": WINDOWS, "prompt": PROMPT, "generate": GENERATE}


def _tokens(dataset_path: str, model_path: str) -> torch.Tensor:
    """The text files of the dataset folder, tokenized and cut into windows: (windows, WINDOW) token ids."""
    key = f"tokens:{dataset_path}:{model_path}"
    if key not in _CACHE:
        from transformers import AutoTokenizer

        files = sorted(Path(dataset_path).glob("*.txt")) if Path(dataset_path).is_dir() else [Path(dataset_path)]
        text = "\n\n".join(f.read_text(encoding="utf-8") for f in files)
        ids = AutoTokenizer.from_pretrained(model_path)(text, return_tensors="pt")["input_ids"][0]
        count = min(WINDOWS, len(ids) // WINDOW)
        if count < 1:
            raise ValueError(f"the text has {len(ids)} tokens, fewer than one window of {WINDOW}; add text or set "
                             "MODEL_OPT_LM_WINDOW lower")
        _CACHE[key] = ids[: count * WINDOW].reshape(count, WINDOW)
    return _CACHE[key]


def _logits(model: Any, ids: torch.Tensor) -> torch.Tensor:
    out = model(input_ids=ids)
    return out.logits if hasattr(out, "logits") else (out[0] if isinstance(out, tuple) else out)


def _reference(dataset_path: str, model_path: str) -> torch.Tensor:
    """The float model's top-1 next tokens on every window (computed once)."""
    key = f"reference:{dataset_path}:{model_path}"
    if key not in _CACHE:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(model_path).eval()
        with torch.inference_mode():
            _CACHE[key] = torch.cat([_logits(model, row[None]).argmax(-1) for row in _tokens(dataset_path,
                                                                                               model_path)])
    return _CACHE[key]


def evaluate(model: Any, dataset_path: str, model_path: str, compiled: bool = False) -> dict[str, float]:
    ids = _tokens(dataset_path, model_path)
    losses, agree, predicted = [], 0, []
    with torch.inference_mode():
        for row in ids:
            logits = _logits(model, row[None]).float()
            losses.append(torch.nn.functional.cross_entropy(logits[0, :-1], row[1:], reduction="sum").item())
            predicted.append(logits.argmax(-1))
        reference = _reference(dataset_path, model_path)
        agree = (torch.cat(predicted) == reference).float().mean().item()
    metrics = {"perplexity": math.exp(sum(losses) / (ids.shape[0] * (WINDOW - 1))), "next_token_agreement": agree}
    prompt = ids[:1, :PROMPT]
    metrics["prefill_ms"] = _prefill_ms(model, prompt)
    if callable(getattr(model, "generate", None)):
        key = "decode_tokens_per_s_compiled" if compiled else "decode_tokens_per_s"
        metrics[key] = _decode_tokens_per_s(model, prompt, compiled)
    return metrics


def _prefill_ms(model: Any, prompt: torch.Tensor, calls: int = 5) -> float:
    with torch.inference_mode():
        _logits(model, prompt)
        started = time.perf_counter()
        for _ in range(calls):
            _logits(model, prompt)
    return (time.perf_counter() - started) / calls * 1000


def _decode_tokens_per_s(model: Any, prompt: torch.Tensor, compiled: bool = False, cache: str | None = "static"
                         ) -> float:
    """Greedy decode with a static KV cache (``cache=None``: transformers' growing one): tokens per second over
    the generated tokens (prefill excluded); ``compiled``: with the forward compiled for the time of the
    measurement (the model is left as it was)."""
    if not compiled:
        return _time_decode(model, prompt, cache)
    import torch._inductor.config as inductor_config

    own = model.__dict__.get("forward")  # a wrapper's own forward (NNCF's hooks) is put back afterwards
    model.forward = torch.compile(model.forward)  # an instance attribute, removed below
    try:
        with inductor_config.patch(freezing=True):
            return _time_decode(model, prompt, cache)
    finally:
        if own is not None:
            model.forward = own
        else:
            del model.forward


def _time_decode(model: Any, prompt: torch.Tensor, cache: str | None = "static") -> float:
    """Every call generates the same number of tokens, so the static cache keeps one shape (a compiled model is
    not recompiled); the decode rate comes from the time of each step after the first (the prompt's)."""
    from transformers import StoppingCriteria, StoppingCriteriaList

    stamps: list[float] = []

    class Stamp(StoppingCriteria):
        def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: Any) -> torch.Tensor:
            stamps.append(time.perf_counter())
            return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)

    kwargs = {"do_sample": False, "pad_token_id": 0, "max_new_tokens": GENERATE, "min_new_tokens": GENERATE,
              "stopping_criteria": StoppingCriteriaList([Stamp()]),
              **({"cache_implementation": cache} if cache else {})}
    with torch.inference_mode():
        model.generate(prompt, **kwargs)  # warm up (compiles, when compiled)
        stamps.clear()
        model.generate(prompt, **kwargs)
    return (len(stamps) - 1) / max(stamps[-1] - stamps[0], 1e-9)


def example_input(dataset_path: str, model_path: str) -> dict[str, torch.Tensor]:
    return {"input_ids": _tokens(dataset_path, model_path)[:1, :PROMPT]}


def calibration_data(dataset_path: str, model_path: str) -> list[dict[str, torch.Tensor]]:
    return [{"input_ids": row[None]} for row in _tokens(dataset_path, model_path)[:8]]
