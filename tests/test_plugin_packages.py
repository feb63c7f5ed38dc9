"""Each backend directory in plugins/ is its own installed distribution with a `model_opt` entry point."""

from __future__ import annotations

from importlib.metadata import distribution
from pathlib import Path

import pytest
import tomllib
from model_opt.plugins import PluginManager

ROOT = Path(__file__).resolve().parents[1]
PLUGIN_DIRS = sorted(p for p in (ROOT / "plugins").iterdir() if (p / "pyproject.toml").exists())
EXPECTED = {"torchao", "nncf", "neural-compressor", "torch-pruning", "tome", "tomesd", "svd", "fusion"}


def test_all_eight_backends_have_a_distribution() -> None:
    assert {p.name for p in PLUGIN_DIRS} == EXPECTED


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
