"""Every hook spec is documented in CONTRIBUTING.md and exercised by a test (datasette-style)."""

from __future__ import annotations

import inspect
import re
from pathlib import Path

import pytest
from model_opt import hookspecs

ROOT = Path(__file__).resolve().parents[1]
HOOKS = sorted(name for name in dir(hookspecs) if hasattr(getattr(hookspecs, name), "model_opt_spec"))


def test_there_are_hooks() -> None:
    assert HOOKS == ["decompose", "fuse", "load_model", "prune", "quantize", "register_commands",
                     "register_techniques", "restore"]


@pytest.mark.parametrize("hook", HOOKS)
def test_hook_is_documented(hook: str) -> None:
    """Each hook has a section whose first code line is the spec's exact signature (parameter names)."""
    text = (ROOT / "CONTRIBUTING.md").read_text()
    section = re.search(rf"^### {hook}\n(.*?)(?=^##)", text, re.M | re.S)
    assert section, f"CONTRIBUTING.md has no '### {hook}' section"
    parameters = ", ".join(inspect.signature(getattr(hookspecs, hook)).parameters)
    assert f"def {hook}({parameters})" in section.group(1), f"the {hook} section does not show def {hook}({parameters})"
    assert getattr(hookspecs, hook).__doc__.strip()


@pytest.mark.parametrize("hook", HOOKS)
def test_hook_is_tested(hook: str) -> None:
    sources = "\n".join(p.read_text() for p in [*ROOT.glob("tests/**/*.py"), *ROOT.glob("plugins/*/tests/*.py")]
                        if p.name != Path(__file__).name)
    assert f"def {hook}(" in sources or f"{hook}=" in sources, f"no test implements the {hook} hook"


def test_contributing_example_matches_the_tested_plugin() -> None:
    text = (ROOT / "CONTRIBUTING.md").read_text()
    for path in ("tests/data/example_plugin/pyproject.toml",
                 "tests/data/example_plugin/src/model_opt_strip_dropout/plugin.py"):
        assert (ROOT / path).read_text().strip() in text, f"CONTRIBUTING.md is out of date with {path}"
