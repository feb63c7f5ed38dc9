"""Startup stays light: --help and `plugins` import neither torch nor any backend."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

BACKENDS = ("torch", "torchao", "nncf", "neural_compressor", "torch_pruning", "timm", "tomesd", "diffusers",
            "openvino")

PROBE = f"""
import json, sys
sys.argv = ["model-opt", *json.loads(sys.argv[1])]
from model_opt_cli.main import main
try:
    main()
except SystemExit:
    pass
print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in {BACKENDS!r})))
"""


@pytest.mark.parametrize("args", [["--help"], ["plugins"], ["techniques"], ["optimize", "--help"]])
def test_cli_startup_imports_no_torch_or_backend(args: list[str]) -> None:
    proc = subprocess.run([sys.executable, "-c", PROBE, json.dumps(args)], capture_output=True, text=True,
                          check=True)
    loaded = json.loads(proc.stdout.strip().splitlines()[-1])
    assert loaded == [], f"model-opt {' '.join(args)} imported {loaded}"


def test_version(cli) -> None:
    result = cli("--version")
    assert result.exit_code == 0
    assert result.stdout.strip() == "model-opt 0.1.0"


@pytest.mark.parametrize("args", [["--help"], ["optimize", "--help"], ["autotune", "--help"]])
def test_help_shows_no_value_for_on_off_flags(args: list[str]) -> None:
    proc = subprocess.run([sys.executable, "-m", "model_opt_cli.main", *args], capture_output=True, text=True,
                          env={"COLUMNS": "200", "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0, proc.stderr
    assert "<bool>" not in proc.stdout and "--help" in proc.stdout
    if args[0] == "optimize":
        assert "Hugging Face folder" in proc.stdout and "OpenVINO IR" in proc.stdout  # what MODEL may be
        assert "--prune-amount" in proc.stdout and "--rank-ratio" in proc.stdout  # kind-level flags, from plugins
