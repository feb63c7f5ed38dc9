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
    assert root[folder.name] == [project["name"]]
