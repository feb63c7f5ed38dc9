"""The seed's Python API: thin classes that dispatch through the plugin registry.

>>> from model_opt.techniques import Pruner
>>> model = Pruner().prune_model(model, amount=0.5, criterion="l1", prune_type="unstructured")

A backend that is not installed raises :class:`model_opt.errors.BackendNotInstalled`, whose message
names the ``pip install "model-opt[...]"`` to run.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Sequence
from typing import Any


def run_technique(kind: str, model: Any, *, backend: str | None = None, method: str | None = None,
                  options: dict[str, Any] | None = None, **inputs: Any) -> tuple[Any, dict[str, Any]]:
    """Resolve one technique, check what it needs, and apply it. Returns ``(model, info)``.

    ``inputs`` are what the technique may use: ``example_input``, ``calibration_data`` (an iterable of model
    inputs), ``train``, ``device`` (default: the model's), ``compile``. The step is recorded on the returned
    model, so that :func:`model_opt.save` writes an artifact that :func:`model_opt.load` replays on the
    original architecture (``model_opt.load(path, model=base)``).
    """
    from model_opt.artifact.format import STEPS_ATTR
    from model_opt.context import TechniqueContext
    from model_opt.modules import device_of
    from model_opt.plugins import get_plugin_manager
    from model_opt.recommend import detect_family
    from model_opt.steps import Step, apply_step, check, plan

    unknown = sorted(set(inputs) - {"example_input", "calibration_data", "train", "device", "compile"})
    if unknown:
        raise TypeError(f"run_technique() got an unexpected keyword argument {unknown[0]!r}")
    manager = get_plugin_manager()
    planned = plan([Step(kind, backend, method, {k: v for k, v in (options or {}).items() if v is not None})],
                   manager)
    data = inputs.pop("calibration_data", None)
    batches = list(data) if data is not None else None  # a generator is read once
    context = TechniqueContext(**{**inputs, "device": inputs.get("device") or device_of(model)},
                               calibration_data=(lambda: iter(batches)) if batches is not None else None,
                               family=detect_family(model)[0] if hasattr(model, "modules") else None)
    check(model, planned, context)
    previous = list(getattr(model, STEPS_ATTR, []))
    technique, resolved = planned[0]
    new_model, record = apply_step(model, technique, resolved, context, manager)
    with contextlib.suppress(AttributeError, TypeError):
        object.__setattr__(new_model, STEPS_ATTR, [*previous, record.to_dict()])
    return new_model, record.info


def for_family(kind: str, method: str, family: str) -> Any:
    """The installed technique of ``kind`` and ``method`` made for ``family`` models (e.g. token merging for ViTs);
    none installed is an error naming what to install."""
    from model_opt.errors import BackendNotInstalled
    from model_opt.plugins import get_plugin_manager
    from model_opt.registry import plugin_extras

    registry = get_plugin_manager().registry
    found = [t for t in registry.of_kind(kind) if t.method == method and family in t.families]
    if len(found) == 1:
        return found[0]
    if found:
        return registry.find(kind, None, method)  # several: the registry's own "choose one of" error
    missing = sorted(plugin_extras() - {t.plugin for t in registry.techniques.values()})
    hint = f'pip install "model-opt[{",".join(missing)}]"' if missing else 'pip install "model-opt[all]"'
    raise BackendNotInstalled(f"no installed plugin offers {kind} {method} for {family} models", hint)


def call_plugin_function(technique: Any, function: str, *args: Any) -> Any:
    """Call a module-level helper (such as ``remove_patch``) of the plugin that provides ``technique``."""
    from model_opt.errors import TechniqueError
    from model_opt.plugins import get_plugin_manager

    helper = getattr(get_plugin_manager().pm.get_plugin(technique.plugin), function, None)
    if not callable(helper):
        raise TechniqueError(f"plugin {technique.plugin!r} offers no {function}()", "see its documentation")
    return helper(*args)


class _Technique:
    def __init__(self) -> None:
        self.info: dict[str, Any] = {}

    def _run(self, kind: str, model: Any, **kwargs: Any) -> Any:
        model, self.info = run_technique(kind, model, **kwargs)
        return model


class Quantizer(_Technique):
    """Quantize a model: ``Quantizer().quantize(model, method='int8_dynamic', example_input=x)``."""

    def quantize(self, model: Any, method: str = "int8_weight_only", example_input: Any = None, *,
                 backend: str | None = None, calibration_data: Iterable[Any] | None = None,
                 device: str | None = None, compile: bool = False, **options: Any) -> tuple[Any, dict[str, Any]]:
        """``compile=True`` tells runtime-aware methods (autoquant) that the model will run compiled."""
        model = self._run("quantize", model, backend=backend, method=method, options=options,
                          example_input=example_input, calibration_data=calibration_data, device=device,
                          compile=compile)
        return model, self.info


class Pruner(_Technique):
    """Prune a model; ``prune_type`` is the method (``unstructured`` or ``structured``)."""

    def prune_model(self, model: Any, amount: float = 0.5, criterion: str | None = None,
                    prune_type: str = "unstructured", example_input: Any = None, *,
                    backend: str | None = None, device: str | None = None, **options: Any) -> Any:
        return self._run("prune", model, backend=backend, method=prune_type,
                         options={"amount": amount, "criterion": criterion, **options},
                         example_input=example_input, device=device)


class LayerFuser(_Technique):
    """Fuse layers: Conv-BN-ReLU folding and Linear-GELU fusion."""

    def fuse_conv_bn_relu(self, model: Any, **options: Any) -> Any:
        return self._run("fuse", model, method="conv_bn_relu", options=options)

    def fuse_linear_gelu(self, model: Any, **options: Any) -> Any:
        return self._run("fuse", model, method="linear_gelu", options=options)

    def fuse_model(self, model: Any, fusion_types: Sequence[str] = ("conv_bn_relu", "linear_gelu"),
                   **options: Any) -> Any:
        infos = {}
        for fusion_type in fusion_types:
            model = self._run("fuse", model, method=fusion_type, options=options)
            infos[fusion_type] = self.info
        self.info = infos
        return model


class Decomposer(_Technique):
    """Low-rank decomposition: ``Decomposer().decompose_model(model, method='svd', rank_ratio=0.5)``; without a
    method, the only installed one."""

    def decompose_model(self, model: Any, method: str | None = None, rank_ratio: float | None = 0.5, *,
                        backend: str | None = None, **options: Any) -> Any:
        return self._run("decompose", model, backend=backend, method=method,
                         options={"rank_ratio": rank_ratio, **options})


__all__ = ["Decomposer", "LayerFuser", "Pruner", "Quantizer", "for_family", "run_technique"]
