"""Helpers shared by tests (fixtures live in the root conftest.py)."""

from __future__ import annotations

import hashlib
from pathlib import Path


def file_hash(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def plugin_module(name: str, **hooks):
    """An in-process plugin: a module object carrying hook implementations."""
    import types

    module = types.ModuleType(name)
    for hook_name, function in hooks.items():
        setattr(module, hook_name, function)
    return module


def write_fidelity_script(digits, folder: Path) -> Path:
    """A digits test script whose metric no changed model can keep: 1 - the largest logit difference
    from the float model in eval mode. Any optimization (or another runtime's float arithmetic) lowers it, so a
    zero budget can never be met."""
    import shutil

    folder.mkdir(parents=True, exist_ok=True)
    shutil.copy(digits.folder / "digits_model.py", folder)
    script = folder / "eval.py"
    script.write_text(digits.script.read_text().replace(
        'return {"accuracy": (predictions == labels).float().mean().item()}',
        'reference = load_model(Path(dataset_path).parent / "model.pth").eval()(images)\n'
        '    return {"fidelity": 1 - (model(images) - reference).abs().max().item()}'))
    return script
