"""Hostile and careless inputs: no code runs without trust, no input or user's file is replaced, no
traceback, no wrong result accepted. Code execution is detected with a marker file the hostile payload
would create."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import textwrap
import uuid
import zipfile
from pathlib import Path

import model_opt
import pytest
import torch
from model_opt.errors import ModelLoadError, TestScriptError
from pt2_craft import hostile_sample_inputs, hostile_second_program, hostile_weight, program_bytes
from test_bad_input import PRUNE, listing, one_error, optimize_args

HOSTILE = {"sample_inputs": hostile_sample_inputs, "use_pickle_weight": hostile_weight,
           "second_program_not_named_json": hostile_second_program}


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
    source.write_bytes(hostile_second_program(marker))  # a second program stored as models/evil.jsox
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


def test_a_recipe_claims_only_the_side_files_its_run_wrote(cli, work: Path) -> None:
    """The artifact lists only what its run wrote (here, its report), so the user's own IR exported beside it
    afterwards is never replaced by a later run writing the same output."""
    out = work / "o.pt"
    result = cli(*optimize_args(work, *PRUNE, "--output", out, "-q"))
    assert result.exit_code == 0, result.stderr
    assert model_opt.artifact.format.read_manifest(out)["files"] == ["o.report.json"]
    result = cli("export", out, "--format", "openvino", "--test-script", work / "eval.py", "--test-dataset",
                 work / "data")
    assert result.exit_code == 0, result.stderr
    before = listing(work)
    line = one_error(cli(*optimize_args(work, *PRUNE, "--output", out, "-q")))
    assert "would replace o.xml beside it, which model-opt did not write" in line
    assert listing(work) == before


def test_a_file_added_inside_an_earlier_output_folder_is_never_deleted(cli, work: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    result = cli(*optimize_args(work, *PRUNE, "--output", f"{out}/", "-q"))
    assert result.exit_code == 0, result.stderr
    result = cli(*optimize_args(work, *PRUNE, "--output", f"{out}/", "-q"))  # its own folder: replaced
    assert result.exit_code == 0, result.stderr
    (out / "notes.md").write_text("the user's notes")
    line = one_error(cli(*optimize_args(work, *PRUNE, "--output", f"{out}/", "-q")))
    assert "holds notes.md, which model-opt did not write there" in line
    from model_opt.errors import UsageError

    with pytest.raises(UsageError, match="holds notes.md"):
        model_opt.save(torch.nn.Linear(2, 2), f"{out}/")
    assert (out / "notes.md").read_text() == "the user's notes"


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


# -- careless input that used to end in a traceback, or be accepted ---------------------------------------


def test_deeply_nested_manifest_is_one_line(tmp_path: Path) -> None:
    path = tmp_path / "nested.pt"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("model_opt.json", "[" * 100000 + "]" * 100000)
    with pytest.raises(ModelLoadError, match="damaged model-opt manifest"):
        model_opt.load(path)


def test_terminal_escapes_from_a_manifest_are_not_printed_raw(tmp_path: Path) -> None:
    path = tmp_path / "escape.pt"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("model_opt.json", json.dumps({"format_version": 2, "payload": "pickle",
                                                       "pickled_because": "\x1b]0;owned\x07" + "x" * 5000}))
    with pytest.raises(ModelLoadError) as caught:
        model_opt.load(path)
    message = str(caught.value)
    assert "\x1b" not in message and "\x07" not in message and len(message) < 600


@pytest.mark.parametrize("args, message", [
    (["--study", "a/b"], "is not a valid study name"),
    (["--study", "s" * 300], "is not a valid study name"),
    (["--timeout", "-5"], "--timeout is -5.0"),
])
def test_autotune_bad_flags_are_refused_before_any_work(cli, work: Path, args: list, message: str) -> None:
    before = listing(work)
    result = cli("autotune", work / "model.pth", "--test-dataset", work / "data", "--test-script", work / "eval.py",
                 "--max-accuracy-drop", "0.01", "--output", work / "tuned.pt", *args, "-q")
    assert message in one_error(result)
    assert listing(work) == before


@pytest.mark.parametrize("env, message", [
    ({"MODEL_OPT_HEARTBEAT_S": "abc"}, "MODEL_OPT_HEARTBEAT_S='abc' is not a whole number"),
    ({"MODEL_OPT_HEARTBEAT_S": "0.5"}, "MODEL_OPT_HEARTBEAT_S='0.5' is not a whole number"),
    ({"MODEL_OPT_HEARTBEAT_S": "0"}, "MODEL_OPT_HEARTBEAT_S='0' is not a whole number"),
    ({"MODEL_OPT_HEARTBEAT_S": "-1"}, "MODEL_OPT_HEARTBEAT_S='-1' is not a whole number"),
    ({"MODEL_OPT_GRACE_S": "abc"}, "MODEL_OPT_GRACE_S='abc' is not a whole number"),
])
def test_bad_lease_settings_are_one_line(cli, work: Path, monkeypatch, env: dict, message: str) -> None:
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    result = cli("autotune", work / "model.pth", "--test-dataset", work / "data", "--test-script", work / "eval.py",
                 "--max-accuracy-drop", "0.01", "--output", work / "tuned.pt", "-q")
    assert message in one_error(result)


def test_a_budget_larger_than_the_metric_leaves_no_journal(cli, work: Path) -> None:
    before = listing(work)
    result = cli("autotune", work / "model.pth", "--test-dataset", work / "data", "--test-script", work / "eval.py",
                 "--max-accuracy-drop", "5", "--output", work / "tuned.pt", "-q")
    assert "larger than the metric itself" in one_error(result)
    assert listing(work) == before


def test_very_long_output_and_model_names_fail_before_any_work(cli, work: Path) -> None:
    line = one_error(cli(*optimize_args(work, *PRUNE, "--output", work / ("o" * 250 + ".pt"), "-q")))
    assert "too long" in line
    long_model = work / ("m" * 245 + ".pth")
    shutil.copy(work / "model.pth", long_model)
    line = one_error(cli("optimize", long_model, "--test-dataset", work / "data", "--test-script", work / "eval.py",
                         *PRUNE, "-q"))
    assert "too long" in line


def test_recommend_refuses_an_unknown_device(cli, work: Path) -> None:
    assert "unknown device 'banana'" in one_error(cli("recommend", work / "model.pth", "--test-script",
                                                      work / "eval.py", "--device", "banana"))


def test_input_shape_with_a_non_number_is_refused(cli, work: Path) -> None:
    assert "is not a list of integers" in one_error(cli(*optimize_args(work, *PRUNE, "--input-shape", "1,x,8",
                                                                       "-q")))


def test_output_ending_in_a_slash_is_a_folder(cli, work: Path, tmp_path: Path) -> None:
    result = cli(*optimize_args(work, *PRUNE, "--output", f"{tmp_path / 'newdir'}/", "-q"))
    assert result.exit_code == 0, result.stderr
    assert {p.name for p in (tmp_path / "newdir").iterdir()} == {"model.safetensors", "model_opt.json"}
    assert (tmp_path / "newdir.report.json").is_file()
    import model_opt

    reopened = model_opt.load(tmp_path / "newdir", test_script=work / "eval.py")
    assert sum(int((p == 0).sum()) for p in reopened.parameters()) > 0  # the pruned weights


@pytest.mark.slow
def test_train_returning_a_wrapped_model_or_its_loss_saves_a_model_that_reopens(cli, work: Path) -> None:
    for body in ("import torch\n\n_train = train\n\ndef train(model, dataset_path, steps):\n"
                 "    _train(model, dataset_path, steps)\n    return torch.nn.DataParallel(model)\n",
                 "_train = train\n\ndef train(model, dataset_path, steps):\n"
                 "    _train(model, dataset_path, steps)\n    return 0.25\n"):
        script = _script(work, body)
        out = work / f"{script.stem}.pt"
        result = cli("optimize", work / "model.pth", "--test-dataset", work / "data", "--test-script", script,
                     "--prune", "--prune-backend", "torch-pruning", "--prune-amount", "0.3", "--finetune-steps", "5",
                     "--output", out, "-q")
        assert result.exit_code == 0, result.stderr
        reopened = model_opt.load(out, test_script=script)
        assert type(reopened).__name__ == "DigitsNet"


def test_model_opt_save_never_replaces_a_users_file_a_pipe_or_a_device(tmp_path: Path) -> None:
    from model_opt.errors import UsageError

    model = torch.nn.Linear(2, 2)
    users = tmp_path / "digits_model.py"
    users.write_text("class DigitsNet: ...\n")
    fifo = tmp_path / "pipe.pt"
    os.mkfifo(fifo)
    for path in (users, fifo, Path("/dev/null")):
        with pytest.raises(UsageError):
            model_opt.save(model, path)
    assert users.read_text() == "class DigitsNet: ...\n"
    model_opt.save(model, tmp_path / "a.pt")
    model_opt.save(model, tmp_path / "a.pt")  # its own artifact may be replaced


def _run_cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "model_opt_cli.main", *map(str, args)], capture_output=True,
                          text=True, timeout=600)


@pytest.mark.slow
def test_json_stdout_survives_a_script_writing_to_fd_1(work: Path) -> None:
    script = _script(work, "import os\n\n_evaluate = evaluate\n\ndef evaluate(model, dataset_path):\n"
                           "    os.write(1, b'noise from the script\\n')\n    print('more noise')\n"
                           "    return _evaluate(model, dataset_path)\n")
    proc = _run_cli("optimize", work / "model.pth", "--test-dataset", work / "data", "--test-script", script, *PRUNE,
                    "--output", work / "o.pt", "--json", "-q")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["after"]


@pytest.mark.parametrize("args, message", [
    (["optimize"], "Error: Missing argument 'model'; see model-opt optimize --help"),
    (["optimize", "m.pt", "--test-dataset", "d", "--test-script", "e.py", "--bogus"], "No such option: --bogus"),
    (["nosuch"], "Error: No such command 'nosuch'; see model-opt --help"),
])
def test_usage_errors_are_one_line(args: list, message: str) -> None:
    proc = _run_cli(*args)
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and message in proc.stderr, proc.stderr


def test_an_unstable_measurement_shows_a_range_not_a_headline() -> None:
    from model_opt.measure import Latency
    from model_opt.report import Measurement, Report

    def measured(median: float, spread: float, rounds: list[float]) -> Measurement:
        latency = Latency(median, median * 1.5, 30, "eager", spread, True, rounds)
        return Measurement({"accuracy": 0.9}, "accuracy", 10, 10, 100, latency)

    steady = Report("m.pt", "cpu", 2, True, measured(10.0, 0.1, [10, 10]), measured(5.0, 0.1, [5, 5]))
    assert "2.00x faster" in steady.render()
    busy = Report("m.pt", "cpu", 2, True, measured(10.0, 0.9, [9.0, 12.0]), measured(5.0, 0.2, [4.5, 3.0]))
    text = busy.render()
    assert "2.00x faster" not in text and "2.00-4.00x, unstable" in text
    assert busy.to_dict()["latency_stable"] is False and busy.to_dict()["speedup_range"] == (2.0, 4.0)
    slow = Report("m.pt", "cpu", 2, True, measured(1.0, 0.1, [1, 1]), measured(10.0, 0.1, [10, 10]))
    assert "10.00x slower" in slow.render() and "0.10x" not in slow.render()


def test_a_killed_program_mode_run_leaves_no_child_and_its_copy_is_swept(work: Path, tmp_path: Path) -> None:
    """SIGKILL model-opt while a program-mode script evaluates: the evaluation child dies with it, and the
    pickled copy of the model it left in the temp folder is removed by the next run."""
    import signal
    import tempfile
    import time

    pid_file = tmp_path / "child.pid"
    script = work / "eval_slow.py"
    script.write_text(f"import os, time\nopen({str(pid_file)!r}, 'w').write(str(os.getpid()))\ntime.sleep(120)\n"
                      "print('accuracy = 0.5')\n")
    proc = subprocess.Popen([sys.executable, "-m", "model_opt_cli.main", "optimize", str(work / "model_whole.pth"),
                             "--trust-model", "--test-dataset", str(work / "data"), "--test-script", str(script),
                             *PRUNE, "--output", str(work / "o.pt"), "-q"], stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not pid_file.exists() and time.time() < deadline:
        time.sleep(0.2)
    assert pid_file.exists()
    time.sleep(0.3)
    left = [p for p in Path(tempfile.gettempdir()).glob(f"model-opt-eval-{proc.pid}-*")]
    assert left  # the pickled copy the child is evaluating
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    child = int(pid_file.read_text())
    for _ in range(50):
        try:
            state = Path(f"/proc/{child}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (FileNotFoundError, ProcessLookupError):
            break
        if state in ("Z", "X"):  # dead, waiting to be reaped by whoever adopted it
            break
        time.sleep(0.1)
    else:
        os.kill(child, signal.SIGKILL)
        pytest.fail("the evaluation child outlived model-opt")
    from model_opt.atomic import remove_stale_temp

    remove_stale_temp(Path(tempfile.gettempdir()), "model-opt-eval-")  # what the next program-mode run does first
    assert not any(p.exists() for p in left)


# -- worker processes (timing, memory) ----------------------------------------------------------------------


def test_workers_import_nothing_from_the_working_directory_and_call_hooks_as_the_job_does(
        cli, work: Path, tmp_path: Path, monkeypatch) -> None:
    """A stdlib-named module planted in the working directory does not run in the timing workers (``python -m``
    would put the working directory first); a load_model that takes model_path works there as in the job, so
    both models are timed each in its own process (no fallback note)."""
    marker = tmp_path / "planted-ran"
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    (cwd / "statistics.py").write_text(f"import pathlib\npathlib.Path({str(marker)!r}).touch()\n"
                                       "raise SystemExit('planted statistics ran')\n")
    script = _script(work, "_load = load_model\n\ndef load_model(path, model_path):\n"
                           "    assert model_path.endswith('model.pth'), model_path\n    return _load(path)\n")
    monkeypatch.chdir(cwd)
    monkeypatch.setenv("MODEL_OPT_TIMING", "process")
    result = cli("optimize", work / "model.pth", "--test-dataset", work / "data", "--test-script", script, *PRUNE,
                 "--output", tmp_path / "o.pt", "-q")
    assert result.exit_code == 0, result.stderr
    report = json.loads((tmp_path / "o.report.json").read_text())
    assert report["latency_note"] == "" and report["after"]["latency"]["median_ms"] > 0
    assert not marker.exists()


def test_the_memory_worker_imports_nothing_from_the_working_directory(tmp_path: Path, monkeypatch) -> None:
    from model_opt.memory import peak_memory
    from model_opt.timing import Deployed

    marker = tmp_path / "planted-ran"
    (tmp_path / "statistics.py").write_text(f"import pathlib\npathlib.Path({str(marker)!r}).touch()\n")
    torch.jit.save(torch.jit.script(torch.nn.Linear(4, 4).eval()), tmp_path / "m.pt")
    monkeypatch.chdir(tmp_path)
    assert peak_memory({"m": Deployed(str(tmp_path / "m.pt"))}, torch.randn(1, 4))["m"] > 0
    assert not marker.exists()


# -- remote code in Hugging Face folders --------------------------------------------------------------------------


@pytest.mark.slow
def test_a_folder_asking_for_its_own_code_never_runs_it_even_when_the_user_says_yes(lm, tmp_path: Path) -> None:
    """A model-opt output folder whose config.json was changed to an architecture only its own code defines
    (auto_map): optimized again with the built-in LM evaluation (tokenizer, reference model), it is opened from
    its recipe and nothing asks, so a 'y' on stdin changes nothing and the folder's code never runs. A plain input
    folder like it is refused in one line."""
    marker = tmp_path / "remote-code-ran"
    evil = (f"import pathlib\npathlib.Path({str(marker)!r}).touch()\n"
            "from transformers import LlamaConfig, LlamaForCausalLM\n\n"
            "class EvilConfig(LlamaConfig):\n    model_type = 'evil'\n\n"
            "class EvilModel(LlamaForCausalLM):\n    config_class = EvilConfig\n")
    env = {**os.environ, "MODEL_OPT_LM_WINDOW": "64", "MODEL_OPT_LM_WINDOWS": "2", "MODEL_OPT_LM_PROMPT": "8",
           "MODEL_OPT_LM_GENERATE": "4", "HF_HUB_OFFLINE": "1"}

    def optimize(source: Path, out: Path) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "model_opt_cli.main", "optimize", str(source), "--test-dataset",
                               str(lm["text"]), "--prune", "--prune-amount", "0.2", "--output", f"{out}/", "-q"],
                              input="y\n" * 20, capture_output=True, text=True, timeout=600, env=env)

    def plant(folder: Path) -> None:
        (folder / "modeling_evil.py").write_text(evil)
        config = json.loads((folder / "config.json").read_text())
        config.update(model_type="evil", auto_map={"AutoConfig": "modeling_evil.EvilConfig",
                                                   "AutoModelForCausalLM": "modeling_evil.EvilModel"})
        (folder / "config.json").write_text(json.dumps(config))

    first = tmp_path / "first"
    assert optimize(lm["llama"], first).returncode == 0
    plant(first)
    proc = optimize(first, tmp_path / "second")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert not marker.exists()
    plain = tmp_path / "plain"
    shutil.copytree(lm["llama"], plain)
    plant(plain)
    proc = optimize(plain, tmp_path / "third")
    assert proc.returncode != 0 and proc.stderr.count("\n") == 1 and "transformers could not open plain" in proc.stderr
    assert not marker.exists()
