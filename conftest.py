"""Shared fixtures: the digits example trained once per session, and a CLI runner."""

from __future__ import annotations

import os

import pytest
from typer.testing import CliRunner


@pytest.fixture(scope="session", autouse=True)
def _inductor_cache(tmp_path_factory: pytest.TempPathFactory) -> None:
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(tmp_path_factory.mktemp("inductor-cache")))


@pytest.fixture(scope="session")
def digits(tmp_path_factory: pytest.TempPathFactory):
    """The shipped digits example, trained once: model.pth, data/, eval.py, eval_program.py."""
    from model_opt.examples.digits import prepare

    return prepare(tmp_path_factory.mktemp("digits"), epochs=8)


@pytest.fixture()
def cli():
    """Invoke the model-opt app in-process; returns the click Result (exit_code, stdout, stderr)."""
    from model_opt_cli.main import with_plugins

    app = with_plugins()
    runner = CliRunner()

    def invoke(*args: str):
        return runner.invoke(app, [str(a) for a in args], catch_exceptions=False)

    return invoke
