"""model-opt: make trained PyTorch models smaller and faster, and prove it.

This package imports neither torch nor any backend at import time; the functions below do so when
called.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"


def load(path: str, *, trust_model: bool = False, map_location: str = "cpu", search_paths: Any = ()) -> Any:
    """Reload a model written by model-opt (or a .pt2 / TorchScript file) as an nn.Module."""
    from .modelio import load as _load

    return _load(path, trust_model=trust_model, map_location=map_location, search_paths=search_paths)


def save(model: Any, path: str, manifest: dict[str, Any] | None = None) -> Any:
    """Write ``model`` as a model-opt artifact, atomically."""
    from .modelio import save as _save

    return _save(model, path, manifest)


def optimize(model_path: str, **kwargs: Any) -> Any:
    """Run the optimize pipeline; see :func:`model_opt.pipeline.optimize`."""
    from .pipeline import optimize as _optimize

    return _optimize(model_path, **kwargs)


__all__ = ["__version__", "load", "optimize", "save"]
