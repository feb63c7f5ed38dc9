"""Hostile and careless inputs: no code runs without trust, no input or user's file is replaced, no
traceback, no wrong result accepted. Code execution is detected with a marker file the hostile payload
would create."""

from __future__ import annotations

import io
import json
import os
import shutil
import textwrap
import uuid
import zipfile
from pathlib import Path

import model_opt
import pytest
import torch
from model_opt.errors import ModelLoadError, TestScriptError
from pt2_craft import hostile_sample_inputs, hostile_weight, program_bytes
from test_bad_input import PRUNE, listing, one_error, optimize_args

HOSTILE = {"sample_inputs": hostile_sample_inputs, "use_pickle_weight": hostile_weight}


@pytest.fixture()
def work(digits, tmp_path: Path) -> Path:
    folder = tmp_path / "work"
    shutil.copytree(digits.folder, folder)
    return folder


# -- .pt2 archives ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", sorted(HOSTILE))
def test_hostile_pt2_runs_no_code_in_load_recommend_or_optimize(cli, work: Path, tmp_path: Path, kind: str) -> None:
    marker = tmp_path / "code-ran"
    hostile = work / "model.pt2"
    hostile.write_bytes(HOSTILE[kind](marker))
    with pytest.raises(ModelLoadError, match="cannot be opened safely.*--trust-model"):
        model_opt.load(hostile)
    assert not marker.exists()
    line = one_error(cli("recommend", hostile))
    assert "cannot be opened safely" in line and not marker.exists()
    line = one_error(cli("optimize", hostile, "--test-dataset", work / "data", "--test-script",
                         work / "eval_program.py", *PRUNE, "-q"))
    assert "--trust-model" in line and not marker.exists()


def test_a_clean_pt2_still_opens_without_trust(tmp_path: Path) -> None:
    model = torch.nn.Sequential(torch.nn.Linear(4, 3)).eval()
    path = tmp_path / "clean.pt2"
    x = torch.randn(2, 4)
    path.write_bytes(program_bytes(model, x))
    assert torch.allclose(model_opt.load(path)(x), model(x))


def _artifact(path: Path, manifest: dict, weights: dict) -> Path:
    buffer = io.BytesIO()
    torch.save(weights, buffer)
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("model_opt.json", json.dumps({"format": "model-opt", "format_version": 2,
                                                       "payload": "weights", **manifest}))
        archive.writestr("weights.pt", buffer.getvalue())
    return path


def test_artifact_with_a_hostile_program_as_its_step_or_source_runs_no_code(tmp_path: Path) -> None:
    marker = tmp_path / "code-ran"
    program = hostile_sample_inputs(marker)
    step = {"kind": "quantize", "backend": "neural-compressor", "method": "int8_static", "options": {},
            "state": {"graph": "export"}, "standalone": True, "replayable": True}
    standalone = _artifact(tmp_path / "standalone.pt", {"steps": [step]},
                           {"program": torch.frombuffer(bytearray(program), dtype=torch.uint8)})
    with pytest.raises(ModelLoadError, match="cannot be opened safely"):
        model_opt.load(standalone)
    source = tmp_path / "source.pt2"
    source.write_bytes(program)
    sourced = _artifact(tmp_path / "sourced.pt", {"steps": [], "source": {"path": str(source),
                                                                          "opened_with": "file"}}, {})
    with pytest.raises(ModelLoadError, match="cannot be opened safely"):
        model_opt.load(sourced)
    assert not marker.exists()


# -- modules planted beside a downloaded model ------------------------------------------------------------


def test_module_beside_the_model_file_does_not_shadow_the_users_own(cli, work: Path, tmp_path: Path) -> None:
    name = f"userarch_{uuid.uuid4().hex[:8]}"
    project, downloads = tmp_path / "project", tmp_path / "downloads"
    project.mkdir()
    downloads.mkdir()
    marker = tmp_path / "planted-ran"
    (project / f"{name}.py").write_text("from digits_model import DigitsNet\n")
    (downloads / f"{name}.py").write_text(f"import pathlib\npathlib.Path({str(marker)!r}).touch()\n"
                                          "from digits_model import DigitsNet\n")
    script = (work / "eval.py").read_text().replace("from digits_model import DigitsNet\n", "") \
        .replace("def load_model(path):\n", f"def load_model(path):\n    from {name} import DigitsNet\n")
    (project / "eval.py").write_text(script)
    shutil.copy(work / "digits_model.py", project / "digits_model.py")
    shutil.copy(work / "model.pth", downloads / "weights.pth")
    result = cli("optimize", downloads / "weights.pth", "--test-dataset", work / "data", "--test-script",
                 project / "eval.py", *PRUNE, "--output", tmp_path / "out.pt", "-q")
    assert result.exit_code == 0, result.stderr
    assert not marker.exists()


# -- the user's files are never replaced ------------------------------------------------------------------


def test_an_openvino_input_is_never_overwritten_by_the_outputs_ir(cli, work: Path) -> None:
    (work / "model.xml").write_text("<net/>")
    (work / "model.bin").write_bytes(b"weights")
    before = listing(work)
    line = one_error(cli("optimize", work / "model.xml", "--test-dataset", work / "data", "--test-script",
                         work / "eval.py", "--quantize", "--quant-backend", "nncf", "--output", work / "model.pt"))
    assert "would overwrite model.xml" in line
    assert listing(work) == before


@pytest.mark.parametrize("side", ["out.xml", "out.bin", "out.pt2", "out.log", "out.report.json",
                                  "out.pareto.png"])
def test_a_users_file_beside_the_output_is_never_replaced(cli, work: Path, side: str) -> None:
    (work / side).write_text("the user's own file")
    before = listing(work)
    line = one_error(cli(*optimize_args(work, *PRUNE, "--output", work / "out.pt", "-q")))
    assert f"would replace {side} beside it" in line
    assert listing(work) == before


def test_a_symlinked_report_is_refused_and_its_target_kept(cli, work: Path, tmp_path: Path) -> None:
    precious = tmp_path / "precious.txt"
    precious.write_text("keep me")
    (work / "out.report.json").symlink_to(precious)
    line = one_error(cli(*optimize_args(work, *PRUNE, "--output", work / "out.pt", "-q")))
    assert "out.report.json" in line and precious.read_text() == "keep me"


def test_a_rerun_replaces_its_own_side_files(cli, work: Path) -> None:
    for _ in range(2):
        result = cli(*optimize_args(work, *PRUNE, "--output", work / "out.pt", "--export", "-q"))
        assert result.exit_code == 0, result.stderr
    assert (work / "out.pt2").exists() and (work / "out.report.json").exists()
    assert not [p.name for p in work.iterdir() if p.name.endswith(".lock") or ".tmp" in p.name]


def test_demo_refuses_before_training_when_its_output_side_file_is_the_users(cli, tmp_path: Path) -> None:
    folder = tmp_path / "demo"
    folder.mkdir()
    (folder / "model.optimized.xml").write_text("the user's IR")
    before = listing(folder)
    line = one_error(cli("demo", "--folder", folder))
    assert "model.optimized.xml" in line
    assert listing(folder) == before


def test_a_killed_writers_temporary_file_is_removed_by_the_next_write(tmp_path: Path) -> None:
    from model_opt.atomic import write_text_atomic

    dead = 2**22 + 12345  # above the default pid_max of most systems: no such process
    stale = tmp_path / f".out.pt.{dead}.abcd.tmp.pt"
    stale.write_bytes(b"partial")
    live = tmp_path / f".out.pt.{os.getpid()}.efgh.tmp.pt"
    live.write_bytes(b"another writer of ours, still running")
    write_text_atomic(tmp_path / "out.pt", "done")
    assert not stale.exists() and live.exists()


def test_files_written_together_appear_all_or_none(tmp_path: Path) -> None:
    from model_opt.atomic import atomic_path, written_together

    with pytest.raises(KeyboardInterrupt):
        with written_together():
            with atomic_path(tmp_path / "a.pt") as tmp:
                tmp.write_text("a")
            assert not (tmp_path / "a.pt").exists()  # not in place before the group is complete
            raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []
    with written_together() as done:
        for name in ("a.pt", "a.report.json"):
            with atomic_path(tmp_path / name) as tmp:
                tmp.write_text(name)
    assert sorted(p.name for p in done) == ["a.pt", "a.report.json"]


# -- wrong results and scripts that misbehave -------------------------------------------------------------


@pytest.mark.parametrize("line", ["accuracy = 1e999", "loss: -1e400"])
def test_program_mode_infinite_metric_is_refused(cli, work: Path, line: str) -> None:
    script = work / "eval_inf.py"
    script.write_text(f"print({line!r})\n")
    result = cli("optimize", work / "model_whole.pth", "--trust-model", "--test-dataset", work / "data",
                 "--test-script", script, *PRUNE, "--output", work / "o.pt", "-q")
    assert "printed" in one_error(result) and "finite" in one_error(result)


def _script(work: Path, body: str) -> Path:
    path = work / f"eval_{uuid.uuid4().hex[:6]}.py"
    source = (work / "eval.py").read_text() + "\n" + textwrap.dedent(body)
    path.write_text(source)
    return path


@pytest.mark.parametrize("body, message", [
    ("class Bad:\n    def __float__(self):\n        raise RuntimeError('no')\n\n"
     "def evaluate(model, dataset_path):\n    return Bad()\n", "not a number"),
    ("def load_model(path):\n    return None\n", "load_model() returned NoneType"),
    ("import os\n\ndef evaluate(model, dataset_path):\n    os._exit(0)\n", "os._exit(0) was called"),
])
def test_misbehaving_script_hooks_are_one_line_errors(cli, work: Path, body: str, message: str) -> None:
    script = _script(work, body)
    result = cli("optimize", work / "model.pth", "--test-dataset", work / "data", "--test-script", script, *PRUNE,
                 "--output", work / "o.pt", "-q")
    assert message in one_error(result)
    assert not (work / "o.pt").exists()


def test_load_model_returning_none_is_blamed_on_the_script(work: Path) -> None:
    from model_opt.testscript import TestScript

    script = TestScript(_script(work, "def load_model(path):\n    return None\n"))
    with pytest.raises(TestScriptError, match="load_model"):
        model_opt.modelio.load(work / "model.pth", loader=lambda p: script.call("load_model", p))
