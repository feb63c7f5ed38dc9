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
