"""The hooks a model-opt plugin can implement.

Plugins are found through the ``model_opt`` entry-point group; each one is a module (or object) with
functions decorated by :data:`hookimpl`. See CONTRIBUTING.md for the reference and a full example.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pluggy

from .registry import KINDS  # the kinds, in pipeline order: the hooks that apply a technique  # noqa: F401

if TYPE_CHECKING:
    from .context import TechniqueContext
    from .registry import Technique
    from .result import TechniqueResult

__all__ = ["KINDS", "PROJECT", "hookimpl", "hookspec"]

PROJECT = "model_opt"

hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def register_techniques(register: Callable[[Technique], None]) -> None:
    """Call ``register(Technique(...))`` once for each technique this plugin provides.

    The :class:`model_opt.registry.Technique` record carries the kind (``quantize``, ``prune``,
    ``fuse`` or ``decompose``), backend and method names, a one-line summary, typed options with
    defaults, what the technique needs (example input, calibration data, CUDA) and the packages it
    requires, and the devices it really speeds up. This hook must not import the backend's heavy
    package: it runs for ``model-opt plugins`` and ``--help``. Return nothing.
    """


@hookspec(firstresult=True)
def quantize(model: Any, technique: Technique, options: dict[str, Any],
             context: TechniqueContext) -> TechniqueResult | tuple[Any, dict[str, Any]]:
    """Quantize ``model`` with ``technique`` (a Technique of kind ``quantize``).

    ``options`` are already validated and hold every option with its default filled in;
    ``context`` is a :class:`model_opt.context.TechniqueContext` (device, example input,
    calibration data, training hook, progress callback). Return a
    :class:`model_opt.result.TechniqueResult` (new model, JSON-serializable ``info`` for the report,
    and the JSON ``state`` that :func:`restore` replays), or a plain ``(new_model, info)`` tuple. Only
    the plugin that registered the technique is called; wrappers of every plugin wrap the call.
    """


@hookspec(firstresult=True)
def prune(model: Any, technique: Technique, options: dict[str, Any],
          context: TechniqueContext) -> TechniqueResult | tuple[Any, dict[str, Any]]:
    """Prune ``model`` with ``technique`` (kind ``prune``). Return a ``TechniqueResult``.

    Same contract as :func:`quantize`: ``options`` are validated with defaults filled in, and the
    result's ``info`` mapping is JSON-serializable and goes into the report.
    """


@hookspec(firstresult=True)
def fuse(model: Any, technique: Technique, options: dict[str, Any],
         context: TechniqueContext) -> TechniqueResult | tuple[Any, dict[str, Any]]:
    """Fuse layers of ``model`` with ``technique`` (kind ``fuse``). Return a ``TechniqueResult``.

    Same contract as :func:`quantize`.
    """


@hookspec(firstresult=True)
def decompose(model: Any, technique: Technique, options: dict[str, Any],
              context: TechniqueContext) -> TechniqueResult | tuple[Any, dict[str, Any]]:
    """Decompose layers of ``model`` with ``technique`` (kind ``decompose``). Return a ``TechniqueResult``.

    Same contract as :func:`quantize`.
    """


@hookspec(firstresult=True)
def restore(model: Any, technique: Technique, options: dict[str, Any], state: dict[str, Any],
            context: TechniqueContext) -> Any:
    """Replay one applied step on ``model``, a fresh copy of the architecture the step was applied to.

    ``options`` and ``state`` are what the step recorded (its resolved options and its result's
    ``state``, both from JSON). Rebuild the structure the technique produced (new layer shapes,
    factorized layers, patched blocks, quantized tensor layouts) and return the model; its weights do
    not matter, because :func:`model_opt.load` loads the saved weights into the result (with
    ``load_state_dict(strict=True, assign=True)``). Only the plugin that registered the technique is
    called. A technique whose plugin does not implement this hook is saved as a pickled model, which
    reopens only with ``trust_model=True``.
    """


@hookspec(firstresult=True)
def load_model(path: Path) -> Any:
    """Optional: open a model file in a format this plugin owns (for example OpenVINO IR ``.xml``).

    Return an ``nn.Module`` (or a module-like callable) for ``path`` (a ``pathlib.Path``), or
    ``None`` for files that are not yours; the first plugin that returns a model wins.
    :func:`model_opt.load` asks plugins before trying torch's own formats.
    """


@hookspec
def register_commands(app: Any) -> None:
    """Optional: add commands to the ``model-opt`` Typer ``app`` (``@app.command()``).

    Called only when the CLI starts; keep imports of heavy packages inside the command bodies.
    Return nothing.
    """

