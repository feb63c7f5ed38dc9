"""model-opt: make trained PyTorch models smaller and faster, and prove it.

This package imports neither torch nor any backend at import time; the functions below do so when
called.
"""

from __future__ import annotations

from typing import Any

from .version import __version__


def load(path: str, *, model: Any = None, test_script: str | None = None, trust_model: bool = False,
         map_location: str = "cpu", search_paths: Any = ()) -> Any:
    """Reopen a model written by model-opt (or a .pt2 / TorchScript / OpenVINO IR file) as an nn.Module.

    An artifact is rebuilt, without unpickling, on ``model`` (the original architecture) or else on the
    source model its recipe names, opened safely or by ``test_script``'s ``load_model``; then each step
    is replayed and the saved weights are loaded. Pickled models need ``trust_model=True``.
    """
    from .artifact.format import source_path
    from .modelio import load as _load

    loader = None
    if test_script is not None:
        from .testscript import TestScript

        script = TestScript(test_script, model_path=source_path(path))  # hooks get the MODEL the run was given
        if script.has("load_model"):
            loader = lambda p: script.call("load_model", p)  # noqa: E731
        search_paths = [script.folder, *search_paths]  # the script's folder first
    return _load(path, model=model, trust_model=trust_model, map_location=map_location, search_paths=search_paths,
                 loader=loader)


def save(model: Any, path: str, manifest: dict[str, Any] | None = None) -> Any:
    """Write ``model`` as a model-opt artifact (recipe + weights), atomically; reopen it with
    ``model_opt.load(path, model=<original architecture>)``. A ``path`` ending in '/' (or an existing folder)
    gets a folder: safetensors weights (or the runtime's own files), the Hugging Face config when the model has
    one, and the recipe."""
    import os
    from pathlib import Path

    from .artifact.write import save as _save
    from .artifact.write import save_folder

    text = os.fspath(path)
    if text.endswith(("/", os.sep)) or Path(text).is_dir():
        return save_folder(model, text, manifest)
    return _save(model, path, manifest)


def optimize(model_path: str, **kwargs: Any) -> Any:
    """Run the optimize pipeline; see :func:`model_opt.pipeline.optimize`."""
    from .pipeline import optimize as _optimize

    return _optimize(model_path, **kwargs)


__all__ = ["__version__", "load", "optimize", "save"]
