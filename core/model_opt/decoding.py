"""Greedy decoding for a causal LM that runs in a runtime of its own (OpenVINO, llama.cpp), one loop for all of
them: the runtime keeps the KV cache, the loop feeds it one token per step and does as little as it can between
steps (no copy of the logits, no tensor per token: the ids are a list until the end), since on a small model
that work is a visible share of each token's time. The time spent inside the runtime is counted for the built-in
evaluation's split."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

#: ``step(token_ids, start)``: feed the tokens to the runtime's cache (emptied first when ``start``) and return the
#: last position's logits (a 1-D numpy array the next step may overwrite).
Step = Callable[[list[int], bool], np.ndarray]


def greedy(step: Step, prompt: torch.Tensor, max_new_tokens: int, stopping_criteria: Any = None) -> torch.Tensor:
    """Batch-1 greedy decoding of ``max_new_tokens`` after ``prompt`` (1 x n ids); ``stopping_criteria`` are called
    after every new token with the ids so far and that token's logits, as transformers calls them (the logits are
    valid during the call only). Criteria that only note the time (each with a ``tick()``, as model-opt's
    evaluation stamps each token) get ``tick()`` and no tensors: on a small model in llama.cpp, building the ids and
    logits tensors at every token was a measurable share of the decode time."""
    if prompt.shape[0] != 1:
        raise ValueError("greedy decoding here takes one sequence at a time")
    tokens = prompt[0].tolist()
    ticks = _ticks(stopping_criteria)
    logits = step(list(tokens), True)
    for i in range(max_new_tokens):
        tokens.append(int(logits.argmax()))
        if ticks is not None:
            for tick in ticks:
                tick()
        elif stopping_criteria is not None and bool(stopping_criteria(
                torch.tensor([tokens]), torch.from_numpy(logits if logits.flags.writeable else logits.copy())[None]
        ).all()):
            break
        if i + 1 < max_new_tokens:
            logits = step(tokens[-1:], False)
    return torch.tensor([tokens])


def _ticks(stopping_criteria: Any) -> list[Callable[[], None]] | None:
    """The criteria's ``tick`` methods when every one of them has one (they never stop the loop); else None."""
    if stopping_criteria is None:
        return None
    criteria = list(stopping_criteria) if isinstance(stopping_criteria, list) else [stopping_criteria]
    ticks = [getattr(criterion, "tick", None) for criterion in criteria]
    return ticks if all(callable(tick) for tick in ticks) else None


def count_runtime(module: Any, started: float) -> None:
    """Add the seconds since ``started`` to ``module.runtime_seconds`` (through its ``__dict__``: a torch module's
    ``__setattr__`` at every decoded token costs more than the bookkeeping is worth)."""
    module.__dict__["runtime_seconds"] = module.__dict__.get("runtime_seconds", 0.0) + time.perf_counter() - started
