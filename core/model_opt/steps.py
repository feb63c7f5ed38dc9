"""The techniques a run applies: requested steps resolved into a plan (validated once, without the model),
checked once on the loaded model, applied in pipeline order through their plugins, and recovery fine-tuning
after the steps it repairs."""

from __future__ import annotations

import contextlib
import difflib
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from .context import TechniqueContext
from .errors import DeviceError, ModelOptError, TechniqueError, UsageError, first_line
from .modules import excluded
from .plugins import PluginManager, get_plugin_manager
from .registry import KINDS, Technique
from .report import StepRecord


@dataclass
class Step:
    """One requested technique: kind plus optional backend/method names and raw option values."""

    kind: str
    backend: str | None = None
    method: str | None = None
    options: dict[str, Any] = field(default_factory=dict)


Planned = list[tuple[Technique, dict[str, Any]]]


def plan(steps: Sequence[Step], manager: PluginManager | None = None) -> Planned:
    """Resolve and validate every step (no model needed: names, options, installed packages), sorted into
    pipeline order."""
    manager = manager or get_plugin_manager()
    resolved = []
    for step in sorted(steps, key=lambda s: KINDS.index(s.kind) if s.kind in KINDS else -1):
        technique = manager.registry.find(step.kind, step.backend, step.method)
        options = technique.resolve_options(step.options)
        technique.validate_environment()
        resolved.append((technique, options))
    return resolved


def check(model: Any, planned: Planned, context: TechniqueContext) -> None:
    """What the planned techniques need (device, example input, calibration data, a train() hook) and the module
    names their ``exclude`` options give, checked once on the model before any work."""
    for technique, _ in planned:
        check_needs(technique, context)
    check_module_names(model, planned)


def check_needs(technique: Technique, context: TechniqueContext) -> None:
    label = technique.label
    if "cuda" in technique.needs and not context.device.startswith("cuda"):
        raise DeviceError(f"{label} runs only on a CUDA GPU", "use --device cuda on a machine with a GPU")
    if "example_input" in technique.needs:
        context.require_example_input(label)
    if "calibration_data" in technique.needs and context.calibration_data is None:
        context.require_calibration_data(label)
    if "train" in technique.needs and context.train is None:
        raise TechniqueError(f"{label} trains the model, and no train(model, dataset_path, steps) hook was given",
                             "define train() in the test script (CLI), or pass train=... (Python)")


def check_module_names(model: Any, planned: Planned) -> None:
    """Every name in an ``exclude`` option must name a module (or a prefix of one) of the model."""
    named_modules = getattr(model, "named_modules", None)
    if not callable(named_modules):  # not a torch module (another runtime): nothing to name
        return
    names = [name for name, _ in named_modules() if name]
    for technique, options in planned:
        for entry in options.get("exclude") or []:
            if not any(excluded(n, [entry]) for n in names):
                close = difflib.get_close_matches(entry, names, n=3, cutoff=0.5)
                hint = f"did you mean {', '.join(close)}?" if close else "use names from model.named_modules()"
                raise UsageError(f"{technique.label} exclude={entry} names no module of "
                                 "the model", hint)


def apply_step(model: Any, technique: Technique, options: dict[str, Any], context: TechniqueContext,
               manager: PluginManager | None = None) -> tuple[Any, StepRecord]:
    """Apply one technique through its plugin (checked by :func:`check` first); a backend's own exception becomes a
    one-line error."""
    manager = manager or get_plugin_manager()
    context.technique = technique.label
    context.progress(f"applying {technique.kind} {technique.backend}:{technique.method}")
    started = time.perf_counter()
    try:
        result = manager.apply(technique, model, options, context)
    except ModelOptError as exc:
        exc.technique = technique.name  # which step failed, for the tuner
        raise
    except Exception as exc:  # a backend's own error: one line, unless debugging
        if os.environ.get("MODEL_OPT_DEBUG"):
            raise
        error = TechniqueError(f"{technique.backend} {technique.method} failed on this model "
                               f"({type(exc).__name__}: {first_line(exc)})",
                               "the input is untouched; set MODEL_OPT_DEBUG=1 to see the traceback")
        error.technique = technique.name
        raise error from None
    record = StepRecord(technique.kind, technique.backend, technique.method, technique.plugin, options,
                        result.info, time.perf_counter() - started, state=result.state or {},
                        replayable=result.state is not None and manager.can_restore(technique),
                        standalone=result.standalone)
    return result.model, record


def apply(model: Any, planned: Planned, context: TechniqueContext,
          manager: PluginManager | None = None, allow_unchanged: bool = False) -> tuple[Any, list[StepRecord]]:
    """Apply each planned technique in order; refuse a run in which no step changed anything (unless
    ``allow_unchanged``: other steps of the same run, applied separately, may)."""
    records = []
    for technique, options in planned:
        model, record = apply_step(model, technique, options, context, manager)
        records.append(record)
    unchanged = [r for r in records if r.info.get("changed") is False]
    if records and len(unchanged) == len(records) and not allow_unchanged:
        notes = "; ".join(f"{r.backend} {r.method}: {r.info.get('note', 'no change')}" for r in unchanged)
        raise TechniqueError(f"nothing was optimized ({notes})", "choose a technique or setting that applies "
                             "to this model (see model-opt techniques)")
    return model, records


#: Kinds of technique whose result is still a trainable model that recovery fine-tuning can repair.
RECOVERABLE_KINDS = ("prune", "decompose")


def split_for_recovery(planned: Planned) -> tuple[Planned, Planned]:
    """(steps recovery follows: pruning and decomposition, steps after it: fusion and quantization)."""
    if not any(t.kind in RECOVERABLE_KINDS for t, _ in planned):
        raise UsageError("--finetune-steps recovers what pruning or decomposition changed, and no such step was "
                         "asked for", "add --prune or --decompose, or drop --finetune-steps")
    return ([item for item in planned if item[0].kind in RECOVERABLE_KINDS],
            [item for item in planned if item[0].kind not in RECOVERABLE_KINDS])


def apply_with_recovery(model: Any, split: tuple[Planned, Planned], context: TechniqueContext, manager: PluginManager,
                        train_steps: int, before_recovery: Callable[[Any], None] | None = None
                        ) -> tuple[Any, list[StepRecord]]:
    """Apply the steps recovery follows, fine-tune ``train_steps`` steps with the context's train() hook (if any),
    then apply the rest (:func:`split_for_recovery`); returns the eval-mode model and every step's record."""
    trainable, rest = split
    model, records = apply(model, trainable, context, manager, allow_unchanged=bool(rest))
    model = model.eval()
    if train_steps:
        if before_recovery is not None:
            before_recovery(model)
        model = recover(model, context, train_steps).eval()
    if rest:
        model, more = apply(model, rest, context, manager,
                            allow_unchanged=any(r.info.get("changed") is not False for r in records))
        records += more
    return model.eval(), records


def recover(model: Any, context: TechniqueContext, train_steps: int) -> Any:
    """Recovery fine-tuning through the test script's ``train(model, dataset_path, steps)`` (the context's
    ``train``), pruned zeros kept.

    ``train`` may train in place and return anything (None, its loss) or return the model; a model wrapped
    for training (``DataParallel``, ``DistributedDataParallel``) is unwrapped, so the result saves and reopens
    as the architecture it was given."""
    import torch

    if context.train is None:
        raise TechniqueError("recovery fine-tuning trains the model, and no train(model, dataset_path, steps) hook "
                             "was given", "define train() in the test script (CLI), or pass train=... (Python)")
    with keep_pruned_weights_at_zero(model):
        trained = context.train(model, context.dataset_path, train_steps)
    if not isinstance(trained, torch.nn.Module):
        return model
    while isinstance(trained, (torch.nn.DataParallel, torch.nn.parallel.DistributedDataParallel)):
        trained = trained.module
    return trained


@contextlib.contextmanager
def keep_pruned_weights_at_zero(model: Any, threshold: float = 0.05) -> Iterator[None]:
    """During recovery fine-tuning, keep weights that pruning zeroed at zero (gradients masked, and masks
    re-applied at the end against weight decay), so that recovery does not undo unstructured sparsity."""
    import torch

    masks = {}
    for parameter in model.parameters():
        if parameter.dim() > 1 and parameter.is_floating_point():
            mask = parameter.detach() != 0
            if (~mask).float().mean().item() > threshold:
                masks[parameter] = mask
    hooks = [p.register_hook(lambda grad, m=m: grad * m) for p, m in masks.items()]
    try:
        yield
    finally:
        for hook in hooks:
            hook.remove()
        with torch.no_grad():
            for parameter, mask in masks.items():
                parameter.mul_(mask)
