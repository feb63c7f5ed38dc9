"""Artifacts reopen without running code from the file; crafted and damaged files are one-line errors."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import model_opt
import pytest
import torch
from helpers import plugin_module
from model_opt.errors import ModelLoadError
from model_opt.hookspecs import hookimpl
from model_opt.plugins import PluginManager
from model_opt.registry import Technique
from torch import nn


class TouchOnUnpickle:
    """Unpickling this creates a file: the proof that code from the file ran."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def crafted(tmp_path: Path, manifest: object = None, name: str = "crafted.pt", member: str = "model.pt") -> Path:
    """A zip that looks like a model-opt artifact and whose payload touches tmp_path/RAN when unpickled."""
    buffer = io.BytesIO()
    torch.save(TouchOnUnpickle(tmp_path / "RAN"), buffer)
    path = tmp_path / name
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("model_opt.json", json.dumps({} if manifest is None else manifest))
        archive.writestr(member, buffer.getvalue())
    return path


def test_crafted_artifact_runs_no_code_without_trust(tmp_path: Path) -> None:
    path = crafted(tmp_path, {"import_paths": [str(tmp_path)]})
    before = list(sys.path)
    with pytest.raises(ModelLoadError, match=r"^crafted.pt was written by model-opt format 1, which pickles the "
                                             r"whole model; reopening it runs code from the file; pass --trust-model"):
        model_opt.load(path)
    assert not (tmp_path / "RAN").exists()
    assert sys.path == before


def test_crafted_weights_payload_is_refused_by_the_safe_loader(tmp_path: Path) -> None:
    """A format-2 manifest that claims plain weights still cannot smuggle a pickle in."""
    path = crafted(tmp_path, {"format": "model-opt", "format_version": 2, "payload": "weights", "steps": []},
                   member="weights.pt")
    with pytest.raises(ModelLoadError, match="the weights in crafted.pt are damaged or not plain tensors"):
        model_opt.load(path, model=nn.Linear(2, 2))
    assert not (tmp_path / "RAN").exists()


@pytest.mark.parametrize("command", ["optimize", "recommend", "autotune"])
def test_crafted_artifact_through_the_cli_runs_nothing(cli, digits, tmp_path: Path, command: str) -> None:
    path = crafted(tmp_path)
    extra = {"optimize": ["--prune"], "recommend": [], "autotune": ["--max-accuracy-drop", "0.1", "--trials", "1"]}
    args = [command, path, "--test-script", digits.script, "--test-dataset", digits.dataset, *extra[command]]
    if command != "recommend":
        args += ["--output", tmp_path / "out.pt", "-q"]
    # the test script's load_model must not be the way in either: use a script without one
    script = tmp_path / "eval.py"
    script.write_text("def evaluate(model, dataset_path):\n    return 1.0\n")
    args[args.index(digits.script)] = script
    result = cli(*args)
    assert result.exit_code == 1
    assert result.stderr.count("\n") == 1 and "pass --trust-model" in result.stderr
    assert not (tmp_path / "RAN").exists()
    assert sorted(os.listdir(tmp_path)) == ["crafted.pt", "eval.py"]


def test_trusted_old_artifact_still_opens(tmp_path: Path) -> None:
    model = nn.Linear(3, 2)
    buffer = io.BytesIO()
    torch.save(model, buffer)
    path = tmp_path / "old.pt"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("model_opt.json", json.dumps({"format": "model-opt", "format_version": 1}))
        archive.writestr("model.pt", buffer.getvalue())
    x = torch.randn(4, 3)
    torch.testing.assert_close(model_opt.load(path, trust_model=True)(x), model(x))


def _no_restore_manager(monkeypatch) -> PluginManager:
    """A third-party technique without a restore hook."""

    @hookimpl
    def register_techniques(register):
        register(Technique("decompose", "acme", "halve", "halve every weight", speeds_up=()))

    @hookimpl
    def decompose(model, technique, options, context):
        with torch.no_grad():
            for parameter in model.parameters():
                parameter.mul_(0.5)
        return model, {"halved": True}

    manager = PluginManager(load_entry_points=False)
    manager.register(plugin_module("acme", register_techniques=register_techniques, decompose=decompose), "acme")
    import model_opt.plugins as plugins

    monkeypatch.setattr(plugins, "_MANAGER", manager)
    return manager


def test_a_step_without_restore_is_saved_pickled_and_needs_trust(monkeypatch, tmp_path: Path) -> None:
    _no_restore_manager(monkeypatch)
    from model_opt.techniques import Decomposer

    model = Decomposer().decompose_model(nn.Linear(4, 4), method="halve", backend="acme", rank_ratio=None)
    path = model_opt.save(model, tmp_path / "acme.pt")
    from model_opt.artifact.format import read_manifest

    manifest = read_manifest(path)
    assert manifest["payload"] == "pickle"
    with pytest.raises(ModelLoadError, match=r"acme.pt holds a pickled model \(decompose:acme:halve cannot be "
                                             r"replayed: its plugin has no restore hook\); .* pass --trust-model"):
        model_opt.load(path)
    x = torch.randn(2, 4)
    torch.testing.assert_close(model_opt.load(path, trust_model=True)(x), model(x))


def test_seed_api_steps_replay_on_a_fresh_architecture(tmp_path: Path) -> None:
    from model_opt.techniques import Pruner

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    pruned = Pruner().prune_model(model, amount=0.5, criterion="l1", prune_type="unstructured")
    path = model_opt.save(pruned, tmp_path / "p.pt")
    fresh = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    x = torch.randn(3, 8)
    torch.testing.assert_close(model_opt.load(path, model=fresh)(x), pruned(x), rtol=0, atol=0)
    with pytest.raises(ModelLoadError, match=r"the weights in p.pt do not fit the model \(.*size mismatch"):
        model_opt.load(path, model=nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 4)))


def _zip(path: Path, members: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w") as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return path


def _weights() -> bytes:
    buffer = io.BytesIO()
    torch.save(nn.Linear(2, 2).state_dict(), buffer)
    return buffer.getvalue()


V2 = {"format": "model-opt", "format_version": 2, "payload": "weights", "steps": []}
MALFORMED = [
    ("bad-json.pt", {"model_opt.json": b"{not json"}, False, "bad-json.pt has a damaged model-opt manifest"),
    ("list.pt", {"model_opt.json": b"[1, 2]"}, False, "list.pt has a model-opt manifest that is a list, not a mapping"),
    ("no-weights.pt", {"model_opt.json": json.dumps(V2).encode()}, False, r"no-weights.pt has no weights \(weights.pt"),
    ("no-payload.pt", {"model_opt.json": b"{}"}, True, r"no-payload.pt has no model payload \(model.pt is missing\)"),
    ("paths.pt", {"model_opt.json": b'{"import_paths": 5}', "model.pt": b"x"}, True,
     "paths.pt: the manifest's import_paths are not a list of folders"),
    ("garbage.pt", {"model_opt.json": b"{}", "model.pt": b"garbage"}, True,
     "the model payload of garbage.pt is damaged"),
    ("steps.pt", {"model_opt.json": json.dumps({**V2, "steps": "all"}).encode(), "weights.pt": _weights()}, False,
     "steps.pt: the manifest's steps are a str, not a list"),
    ("step.pt", {"model_opt.json": json.dumps({**V2, "steps": [{"kind": 3}]}).encode(), "weights.pt": _weights()},
     False, "step.pt: step 0 of the manifest is malformed"),
    ("newer.pt", {"model_opt.json": b'{"format_version": 9}'}, False, r"newer.pt was written by a newer model-opt"),
    ("unknown.pt", {"model_opt.json": json.dumps({**V2, "steps": [{"kind": "prune", "backend": "nope",
                                                                    "method": "x"}]}).encode(),
                    "weights.pt": _weights()}, False, "unknown prune backend 'nope'"),
]


@pytest.mark.parametrize(("name", "members", "trust", "message"), MALFORMED, ids=[m[0] for m in MALFORMED])
def test_malformed_artifacts_are_one_line_errors(tmp_path: Path, name, members, trust, message) -> None:
    path = _zip(tmp_path / name, members)
    with pytest.raises(Exception, match=message) as caught:
        model_opt.load(path, trust_model=trust, model=nn.Linear(2, 2))
    assert "\n" not in str(caught.value)


def test_damaged_files_of_other_formats(tmp_path: Path, capfd) -> None:
    cases = {
        "bad.xml": (b"<net>not ir", "bad.xml is OpenVINO IR without its weights file bad.bin beside it"),
        "bad2.xml": (b"<net>not ir", "could not open bad2.xml"),
        "bad.pt2": (b"PK garbage", "bad.pt2 is not a torch.export program"),
        "fake.ts": (None, "fake.ts is not a TorchScript model"),
    }
    _zip(tmp_path / "fake.ts", {"fake/code/x.py": b"nothing", "fake/constants.pkl": b"x"})
    (tmp_path / "bad2.bin").write_bytes(b"\0" * 16)
    for name, (content, message) in cases.items():
        if content is not None:
            (tmp_path / name).write_bytes(content)
        with pytest.raises(ModelLoadError, match=message) as caught:
            model_opt.load(tmp_path / name)
        assert "\n" not in str(caught.value)
    assert "Traceback" not in capfd.readouterr().err


def test_fifo_and_devices_are_refused_without_reading(tmp_path: Path) -> None:
    fifo = tmp_path / "model.pt"
    os.mkfifo(fifo)
    for path in (fifo, Path("/dev/zero")):
        with pytest.raises(ModelLoadError, match="is not a regular file"):
            model_opt.load(path)


@pytest.mark.slow
def test_optimize_output_reopens_in_a_fresh_process_with_the_test_script(digits, tmp_path: Path) -> None:
    from model_opt.pipeline import optimize
    from model_opt.steps import Step

    out = tmp_path / "structured.pt"
    optimize(digits.model, test_script=digits.script, dataset=digits.dataset, output=out,
             steps=[Step("prune", "torch-pruning", "structured", {"amount": 0.5})])
    manifest = json.loads(zipfile.ZipFile(out).read("model_opt.json"))
    assert manifest["payload"] == "weights" and manifest["source"]["opened_with"] == "load_model"
    assert manifest["steps"][0]["state"]["shapes"]  # the pruned shapes, as JSON
    x = torch.rand(4, 1, 8, 8)
    expected = model_opt.load(out, test_script=digits.script)(x)
    torch.save(x, tmp_path / "x.pt")
    code = ("import sys, torch, model_opt; m = model_opt.load(sys.argv[1], test_script=sys.argv[4]); "
            "torch.save(m(torch.load(sys.argv[2])), sys.argv[3])")
    subprocess.run([sys.executable, "-c", code, str(out), str(tmp_path / "x.pt"), str(tmp_path / "y.pt"),
                    str(digits.script)], check=True, cwd=tmp_path)
    torch.testing.assert_close(torch.load(tmp_path / "y.pt"), expected, rtol=0, atol=0)
    with pytest.raises(ModelLoadError, match="was made from model.pth, which the test script's load_model"):
        model_opt.load(out)
