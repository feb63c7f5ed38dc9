"""Each backend directory in plugins/ is its own installed distribution with a `model_opt` entry point."""

from __future__ import annotations

from importlib.metadata import distribution
from pathlib import Path

import pytest
import tomllib
from model_opt.plugins import PluginManager

ROOT = Path(__file__).resolve().parents[1]
PLUGIN_DIRS = sorted(p for p in (ROOT / "plugins").iterdir() if (p / "pyproject.toml").exists())


def test_every_list_of_first_party_backends_matches_plugins() -> None:
    """plugins/ is the one list: model-opt's extras, its [all] extra and requirements-dev.txt follow it (the
    registry reads the extras from the installed metadata)."""
    from model_opt.registry import plugin_extras

    names = {p.name for p in PLUGIN_DIRS}
    assert len(names) >= 8
    assert plugin_extras() == names
    root = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert {f"model-opt-{n}" for n in names} <= set(root["all"])
    dev = (ROOT / "requirements-dev.txt").read_text().splitlines()
    assert {f"-e plugins/{n}" for n in names} <= set(dev)


@pytest.mark.parametrize("folder", PLUGIN_DIRS, ids=lambda p: p.name)
def test_plugin_distribution_is_installed_and_loads(folder: Path) -> None:
    project = tomllib.loads((folder / "pyproject.toml").read_text())["project"]
    assert project["name"] == f"model-opt-{folder.name}"
    (entry_name, target), = project["entry-points"]["model_opt"].items()
    assert distribution(project["name"]).version == project["version"]
    record = PluginManager().records[entry_name]
    assert record.status == "ok", record.reason
    assert record.distribution == project["name"]
    assert target.startswith(record.module.split(":")[0])
    root = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    # (an extra may add a backend runtime that its plugin leaves out: llama-cpp-python compiles when installed)
    assert root[folder.name][0] == project["name"]


def _code_strings_and_names(path: Path) -> list[tuple[int, str]]:
    """(line, text) of every string literal and name in a module, docstrings and comments left out."""
    import ast

    tree = ast.parse(path.read_text())
    docstrings = {id(node.body[0].value) for node in ast.walk(tree)
                  if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
                  and node.body and isinstance(node.body[0], ast.Expr)
                  and isinstance(node.body[0].value, ast.Constant) and isinstance(node.body[0].value.value, str)}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
            found.append((node.lineno, node.value))
        elif isinstance(node, ast.Name):
            found.append((node.lineno, node.id))
    return found


def test_the_core_and_the_cli_name_no_backend() -> None:
    """Backends are plugins: the core and the CLI know them only through the registry (docstrings may cite
    them as examples; the core's own default plugin, builtin/, and the shipped example are plugins' users)."""
    import re

    names = {folder.name for folder in PLUGIN_DIRS}
    names |= {t.backend for t in PluginManager().registry.techniques.values() if t.plugin in names}
    assert {"torchao", "nncf", "torch-pruning", "tome"} <= names
    pattern = re.compile(rf"(?<![\w-])({'|'.join(map(re.escape, sorted(names)))})(?![\w-])")
    root = ROOT
    files = [p for p in (root / "core" / "model_opt").rglob("*.py")
             if not {"builtin", "examples"} & set(p.relative_to(root / "core" / "model_opt").parts)]
    files += sorted((root / "model_opt_cli").rglob("*.py"))
    hits = [f"{path.relative_to(root)}:{line}: {text[:60]!r}" for path in files
            for line, text in _code_strings_and_names(path) if pattern.search(text)]
    assert not hits, "backend names in core/CLI code:\n" + "\n".join(hits)
