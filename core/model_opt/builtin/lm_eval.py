"""model-opt's built-in evaluation of causal language models, used when MODEL is a causal LM (a Hugging Face
folder whose architecture ends in ForCausalLM/LMHeadModel) and no ``--test-script`` is given; the dataset is
a folder of ``.txt`` files, tokenized with the model folder's tokenizer.

Metrics, perplexity first (the primary metric, lower is better):

- ``perplexity``: exp of the mean next-token loss over fixed windows of the text (``MODEL_OPT_LM_WINDOW``
  tokens each, at most ``MODEL_OPT_LM_WINDOWS`` windows);
- ``next_token_agreement``: how often the model's top-1 next token is the float model's;
- ``prefill_ms``: one forward pass over a prompt of ``MODEL_OPT_LM_PROMPT`` tokens (batch 1);
- ``decode_tokens_per_s``: greedy decoding of ``MODEL_OPT_LM_GENERATE`` tokens after that prompt with a static
  KV cache (``cache_implementation="static"``), one token per step, batch 1, the median of three timed runs; under
  ``--compile``
  ``decode_tokens_per_s_compiled``, the same with the model's forward compiled (torch.compile). The static
  cache is what makes compiled decoding pay: its shapes do not change from one step to the next, so there is
  one graph for the prompt and one for every decode step, while a growing (dynamic) cache changes the shapes
  at every step (recompilations, then a dynamic-shape graph).

- ``decode_runtime_ms_per_token`` and ``decode_overhead_ms_per_token``: where each decoded token's time went, in the
  same generations: inside the model's runtime (its forward; for a module with a runtime of its own, such as an
  OpenVINO or a llama.cpp result, the time it counts in ``runtime_seconds``) and outside it (the decode loop's own
  work: picking the token, the cache's bookkeeping, Python). ``_compiled`` under ``--compile``, as above.

The report's size row gives the weights' memory; ``optimize`` adds each model's peak memory, opened and decoding
in a process of its own (:mod:`model_opt.memory`).

A model that cannot generate (an OpenVINO module other than nncf weight_only's causal LM with its KV
cache) reports no decode figure.
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from model_opt.errors import ModelLoadError, UsageError

HIGHER_IS_BETTER = False
#: Each length's environment variable, default and allowed range (the prompt is cut from the first window).
LENGTHS = {"window": ("MODEL_OPT_LM_WINDOW", 128, 8, 32768), "windows": ("MODEL_OPT_LM_WINDOWS", 16, 1, 4096),
           "prompt": ("MODEL_OPT_LM_PROMPT", 32, 1, 32768), "generate": ("MODEL_OPT_LM_GENERATE", 32, 1, 4096)}
#: The most text read from the dataset, in characters, however many windows are asked for.
MAX_TEXT_CHARS = 64 * 2**20
_CACHE: dict[str, Any] = {}


def settings() -> dict[str, int]:
    """The lengths the figures are measured with (stated in the report), from the environment; a value that is
    not a whole number in its range is a one-line error naming the variable."""
    values = {}
    for name, (variable, default, low, high) in LENGTHS.items():
        text = os.environ.get(variable, "").strip() or str(default)
        high = min(high, values["window"]) if name == "prompt" else high
        if not (text.isdigit() and low <= int(text) <= high):
            within = " (the prompt is cut from one window: MODEL_OPT_LM_WINDOW)" if name == "prompt" else ""
            raise UsageError(f"{variable}={text[:20]!r} is not a whole number from {low} to {high}{within}",
                             f"set it like {variable}={min(default, high)}, or unset it")
        values[name] = int(text)
    return values


def text_files(dataset_path: str | os.PathLike[str]) -> list[Path]:
    """The dataset's text: a .txt file, or the .txt files of a folder; each must be a regular file (a pipe or a
    link to a device would never end)."""
    path = Path(dataset_path)
    files = sorted(path.glob("*.txt")) if path.is_dir() else [path]
    if not files or (not path.is_dir() and path.suffix != ".txt"):
        raise UsageError(f"the built-in language-model evaluation reads text, and {path} is not a .txt file or a "
                         "folder of them", "pass --test-dataset with a folder of .txt files")
    for file in files:
        if not file.is_file():
            raise UsageError(f"{file} is not a regular file (a pipe, a device, or a link to one)",
                             "put plain .txt files in the --test-dataset folder")
    return files


def _read_text(files: list[Path], chars: int) -> tuple[str, bool]:
    """Up to ``chars`` characters of the files in order (joined by blank lines), and whether text was left."""
    parts: list[str] = []
    left = chars
    for index, file in enumerate(files):
        with open(file, encoding="utf-8", errors="replace") as handle:
            part = handle.read(left + 1)
        if len(part) > left:
            parts.append(part[:left])
            return "\n\n".join(parts), True
        parts.append(part)
        left -= len(part) + 2
        if left <= 0:
            return "\n\n".join(parts), index + 1 < len(files)
    return "\n\n".join(parts), False


def tokenizer(model_path: str) -> Any:
    """The model folder's tokenizer, from local files only and without running code from the folder."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(model_path, trust_remote_code=False, local_files_only=True)
    except Exception as exc:
        detail = " ".join(str(exc).split())[:160]
        raise ModelLoadError(f"the tokenizer of {Path(model_path).name} cannot be opened without running code from "
                             f"the folder ({type(exc).__name__}: {detail})",
                             "give the folder a tokenizer transformers knows, or pass --test-script with your "
                             "own evaluate()") from None


def _tokens(dataset_path: str, model_path: str) -> torch.Tensor:
    """The text files of the dataset, tokenized and cut into windows: (windows, window) token ids. Only as much
    text is read and tokenized as the windows need (read again, twice as much, while too short)."""
    lengths = settings()
    window, windows = lengths["window"], lengths["windows"]
    key = f"tokens:{dataset_path}:{model_path}:{window}:{windows}"
    if key not in _CACHE:
        files, tok = text_files(dataset_path), tokenizer(model_path)
        chars = min(window * windows * 8 + 1024, MAX_TEXT_CHARS)
        while True:
            text, more = _read_text(files, chars)
            ids = tok(text, return_tensors="pt")["input_ids"][0]
            if len(ids) >= window * windows or not more or chars >= MAX_TEXT_CHARS:
                break
            chars = min(chars * 2, MAX_TEXT_CHARS)
        count = min(windows, len(ids) // window)
        if count < 1:
            raise UsageError(f"the text in {Path(dataset_path).name} has {len(ids)} tokens, fewer than one window "
                             f"of {window} (MODEL_OPT_LM_WINDOW)", "add text to the --test-dataset folder, or "
                             f"set MODEL_OPT_LM_WINDOW to at most {max(len(ids), 8)}")
        _CACHE[key] = ids[: count * window].reshape(count, window)
    return _CACHE[key]


def _logits(model: Any, ids: torch.Tensor) -> torch.Tensor:
    out = model(input_ids=ids)
    return out.logits if hasattr(out, "logits") else (out[0] if isinstance(out, tuple) else out)


def _reference(dataset_path: str, model_path: str) -> torch.Tensor:
    """The float model's top-1 next tokens on every window (computed once)."""
    key = f"reference:{dataset_path}:{model_path}:{sorted(settings().items())}"
    if key not in _CACHE:
        from model_opt.modelio import load

        # opened as the job opened the input: a Hugging Face folder without remote code, a model-opt folder
        # replayed from its recipe (its config alone describes the architecture before the steps)
        model = load(model_path).eval()
        with torch.inference_mode():
            _CACHE[key] = torch.cat([_logits(model, row[None]).argmax(-1) for row in _tokens(dataset_path,
                                                                                               model_path)])
    return _CACHE[key]


def evaluate(model: Any, dataset_path: str, model_path: str, compiled: bool = False,
             fraction: float | None = None) -> dict[str, float]:
    """Perplexity and next-token agreement over the windows, then prefill and decode timing; with ``fraction``
    (``sensitivity --eval-fraction``), the first share of the windows and no timing."""
    ids = _tokens(dataset_path, model_path)
    if fraction is not None:
        ids = ids[: max(1, math.ceil(ids.shape[0] * fraction))]
    losses, agree, predicted = [], 0, []
    with torch.inference_mode():
        for row in ids:
            logits = _logits(model, row[None]).float()
            losses.append(torch.nn.functional.cross_entropy(logits[0, :-1], row[1:], reduction="sum").item())
            predicted.append(logits.argmax(-1))
        reference = _reference(dataset_path, model_path)[: ids.shape[0]]
        agree = (torch.cat(predicted) == reference).float().mean().item()
    lengths = settings()
    metrics = {"perplexity": math.exp(sum(losses) / (ids.shape[0] * (ids.shape[1] - 1))),
               "next_token_agreement": agree}
    if fraction is not None:  # (a sensitivity measurement reads only the metric)
        return metrics
    prompt = ids[:1, :lengths["prompt"]]
    metrics["prefill_ms"] = _prefill_ms(model, prompt)
    if callable(getattr(model, "generate", None)):
        metrics.update(_decode_tokens_per_s(model, prompt, compiled).metrics(compiled))
    return metrics


@dataclass(frozen=True)
class Decode:
    """One decode measurement: tokens/s after the prompt, and each token's milliseconds inside the model's runtime
    and outside it (None where the model is not a torch module and counts no ``runtime_seconds``)."""

    tokens_per_s: float
    runtime_ms: float | None = None
    overhead_ms: float | None = None

    def metrics(self, compiled: bool = False) -> dict[str, float]:
        """The evaluation's decode metrics (``_compiled`` names for a compiled measurement)."""
        suffix = "_compiled" if compiled else ""
        values = {"decode_tokens_per_s": self.tokens_per_s, "decode_runtime_ms_per_token": self.runtime_ms,
                  "decode_overhead_ms_per_token": self.overhead_ms}
        return {f"{name}{suffix}": value for name, value in values.items() if value is not None}


@contextlib.contextmanager
def _runtime_clock(model: Any) -> Iterator[Callable[[], float] | None]:
    """Seconds spent so far inside the model's runtime: a module with a runtime of its own counts them itself
    (``runtime_seconds``); a torch module is timed from the start to the end of each forward (hooks, removed
    afterwards); None for anything else."""
    if hasattr(model, "runtime_seconds"):
        yield lambda: float(model.runtime_seconds)
        return
    if not isinstance(model, torch.nn.Module):
        yield None
        return
    spent, started = [0.0], [0.0]

    def begin(*_: Any) -> None:
        started[0] = time.perf_counter()

    def end(*_: Any) -> None:
        spent[0] += time.perf_counter() - started[0]

    handles = [model.register_forward_pre_hook(begin), model.register_forward_hook(end)]
    try:
        yield lambda: spent[0]
    finally:
        for handle in handles:
            handle.remove()


def _prefill_ms(model: Any, prompt: torch.Tensor, calls: int = 5) -> float:
    with torch.inference_mode():
        _logits(model, prompt)
        started = time.perf_counter()
        for _ in range(calls):
            _logits(model, prompt)
    return (time.perf_counter() - started) / calls * 1000


def _decode_tokens_per_s(model: Any, prompt: torch.Tensor, compiled: bool = False, cache: str | None = "static"
                         ) -> Decode:
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


def _time_decode(model: Any, prompt: torch.Tensor, cache: str | None = "static", runs: int = 3,
                 warm_up: bool = True) -> Decode:
    """Every call generates the same number of tokens, so the static cache keeps one shape (a compiled model is
    not recompiled); the decode rate comes from the time of each step after the first (the prompt's): the median
    of ``runs`` timed generations after a warm-up (a single run is at the mercy of a busy machine), with that
    generation's split of each token's time between the runtime and the rest (:func:`_runtime_clock`)."""
    from transformers import StoppingCriteria, StoppingCriteriaList

    stamps: list[tuple[float, float]] = []  # (time, seconds in the runtime so far) after each new token

    class Stamp(StoppingCriteria):
        def tick(self) -> None:  # (what a runtime's own loop calls: model_opt.decoding.greedy)
            stamps.append((time.perf_counter(), clock() if clock is not None else 0.0))  # (clock: see below)

        def __call__(self, input_ids: torch.Tensor, *_: Any, **__: Any) -> torch.Tensor:  # (scores: not read)
            self.tick()
            return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)

    generate = settings()["generate"]
    kwargs = {"do_sample": False, "pad_token_id": 0, "max_new_tokens": generate, "min_new_tokens": generate,
              "stopping_criteria": StoppingCriteriaList([Stamp()]),
              **({"cache_implementation": cache} if cache else {})}
    found = []
    with torch.inference_mode(), _runtime_clock(model) as clock:
        if warm_up:
            model.generate(prompt, **kwargs)  # (compiles, when compiled)
        for _ in range(runs):
            stamps.clear()
            model.generate(prompt, **kwargs)
            tokens = len(stamps) - 1
            (first, first_runtime), (last, last_runtime) = stamps[0], stamps[-1]
            runtime_ms = (last_runtime - first_runtime) / tokens * 1000 if clock is not None else None
            per_token_ms = (last - first) / tokens * 1000
            found.append(Decode(tokens / max(last - first, 1e-9), runtime_ms,
                                per_token_ms - runtime_ms if runtime_ms is not None else None))
    return sorted(found, key=lambda d: d.tokens_per_s)[len(found) // 2]


def example_input(dataset_path: str, model_path: str) -> dict[str, torch.Tensor]:
    return {"input_ids": _tokens(dataset_path, model_path)[:1, :settings()["prompt"]]}


def calibration_data(dataset_path: str, model_path: str) -> list[dict[str, torch.Tensor]]:
    return [{"input_ids": row[None]} for row in _tokens(dataset_path, model_path)[:8]]
