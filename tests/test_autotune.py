"""`model-opt recommend` and `model-opt autotune` on the repo's example."""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import timm
import torch
from helpers import write_fidelity_script
from model_opt.recommend import detect_family


def tune_args(digits, *extra) -> list[str]:
    return ["autotune", str(digits.model), "--test-dataset", str(digits.dataset), "--test-script",
            str(digits.script), *map(str, extra)]


def finished_trials(journal: Path, study: str) -> list:
    import optuna
    from optuna.storages.journal import JournalFileBackend, JournalFileOpenLock

    storage = optuna.storages.JournalStorage(JournalFileBackend(str(journal), JournalFileOpenLock(str(journal))))
    try:
        loaded = optuna.load_study(study_name=study, storage=storage)
    except KeyError:  # the worker has created the journal file but not the study yet
        return []
    states = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
    return [t for t in loaded.get_trials(deepcopy=False, states=states) if "skipped" not in t.user_attrs]


def test_detect_family() -> None:
    from diffusers import UNet2DConditionModel

    assert detect_family(timm.create_model("resnet18", pretrained=False))[0] == "cnn"
    assert detect_family(timm.create_model("vit_tiny_patch16_224", pretrained=False))[0] == "vit"
    assert detect_family(torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.GELU()))[0] == "transformer"
    hybrid = torch.nn.ModuleDict({"stem": torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.Conv2d(8, 8, 3)),
                                  "attn": torch.nn.MultiheadAttention(8, 2)})
    assert detect_family(hybrid)[0] == "hybrid"
    unet = UNet2DConditionModel(block_out_channels=(32, 64), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
                                attention_head_dim=8, norm_num_groups=8, layers_per_block=1)
    assert detect_family(unet)[0] == "diffusion"


def test_recommend_prints_why_and_the_command(cli, digits) -> None:
    result = cli("recommend", digits.model, "--test-script", digits.script, "--test-dataset", digits.dataset)
    assert result.exit_code == 0, result.stderr
    assert result.stdout.startswith(f"{digits.model}: cnn (2 convolutions, no attention)")
    assert "- prune torch-pruning:structured: removing 30-50% of channels" in result.stdout
    assert (f"model-opt optimize {digits.model} --test-dataset {digits.dataset} --test-script {digits.script} "
            "--prune --prune-backend torch-pruning --prune-type structured --prune-amount 0.3") in result.stdout


@pytest.mark.slow
def test_finds_a_faster_candidate_within_budget_and_saves_it(cli, digits, tmp_path: Path) -> None:
    out = tmp_path / "best.pt"
    result = cli(*tune_args(digits, "--max-accuracy-drop", "0.3", "--trials", "6", "--backends", "torch-pruning",
                            "--output", out, "--json", "-q"))
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    best = report["best"]
    assert best["drop"] <= 0.3 and best["speedup"] > 0  # structure only: speed belongs in benchmarks/
    assert best["steps"][0]["backend"] == "torch-pruning"
    assert out.exists() and Path(report["plot"]).read_bytes()[:4] == b"\x89PNG"
    assert json.loads((tmp_path / "best.report.json").read_text())["best"]["number"] == best["number"]
    route = report["runtime_route"]  # the route with no technique, timed as the finalists were
    if importlib.util.find_spec("openvino") and importlib.util.find_spec("model_opt_nncf"):
        assert route["runtime"] == "openvino" and route["speedup"] > 0 and route["command"].endswith(" --report")
        named = [w for w in report["warnings"] if "with no technique, ran" in w]
        assert bool(named) == (route["speedup"] > best["remeasured_speedup"])  # named only where it was faster
    import model_opt

    reloaded = model_opt.load(out, test_script=digits.script)
    assert sum(p.numel() for p in reloaded.parameters()) < report["baseline"]["parameters"]


@pytest.mark.slow
def test_the_trial_table_counts_the_trials_that_ran(cli, digits, tmp_path: Path) -> None:
    """The recommendation enqueues several first trials; with --trials 1 only one runs, and the table (and the
    count the user reads) holds that one, not the proposals that never ran."""
    result = cli(*tune_args(digits, "--max-accuracy-drop", "0.5", "--trials", "1", "--output", tmp_path / "one.pt",
                            "--json", "-q"))
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    assert [(t["number"], t["state"]) for t in report["trials"]] == [(1, "COMPLETE")]
    assert report["summary"]["trials"] == 1 and report["summary"]["best_trial"] == 1


@pytest.mark.slow
def test_no_candidate_within_budget_fails_and_saves_nothing(cli, digits, tmp_path: Path) -> None:
    strict = write_fidelity_script(digits, tmp_path / "strict")
    out = tmp_path / "never.pt"
    result = cli("autotune", digits.model, "--test-dataset", digits.dataset, "--test-script", strict,
                 "--max-accuracy-drop", "0", "--trials", "3", "--backends", "torch-pruning,svd",
                 "--output", out, "-q")
    assert result.exit_code == 1
    assert "no candidate stayed within --max-accuracy-drop 0 after 3 trials; the closest was trial" in result.stderr
    if importlib.util.find_spec("openvino"):  # the route without a technique, named with its command
        said = " ".join(result.stderr.split())  # measured: its drop against the budget, and its speed-up
        assert any(f"or no technique: the float model in openvino {verdict} (drop " in said
                   for verdict in ("stays within it", "does not either"))
        assert (f"the original here (model-opt export {digits.model} --format openvino --test-dataset "
                f"{digits.dataset} --test-script {strict} --report)") in said
    assert "Pareto front within budget" in result.stdout
    assert not out.exists()


@pytest.mark.parametrize(("extra", "message"), [
    (["--max-accuracy-drop", "-0.1"], "--max-accuracy-drop must be 0 or more"),
    (["--max-accuracy-drop", "5"], "is larger than the metric itself"),
    (["--max-accuracy-drop", "0.01", "--backends", "basic"], "no technique plugin is installed for the tuner"),
    (["--max-accuracy-drop", "0.01", "--storage", "sqlite:////no/such/dir/study.db"], "cannot reach the storage "
                                                                                      "sqlite:////no/such/dir"),
    (["--max-accuracy-drop", "0.01", "--objective", "tokens-per-second"],
     "--objective tokens-per-second reads decode_tokens_per_s from the evaluation, and eval.py reports no such "
     "metric"),
])
def test_bad_input(cli, digits, tmp_path: Path, extra, message) -> None:
    result = cli(*tune_args(digits, *extra, "--output", tmp_path / "o.pt", "-q"))
    assert result.exit_code != 0
    assert message in result.stderr, result.stderr
    assert not (tmp_path / "o.pt").exists()


#: A lease a busy machine cannot starve (journal trials are failed as dead after the grace period).
PATIENT_LEASE = {"MODEL_OPT_HEARTBEAT_S": "10", "MODEL_OPT_GRACE_S": "300"}


def run_worker(digits, journal: Path, out: Path, trials: int) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "model_opt_cli.main",
                             *tune_args(digits, "--max-accuracy-drop", "0.5", "--trials", trials, "--backends",
                                        "fusion,svd,torch-pruning", "--study", "shared", "--storage", journal,
                                        "--output", out, "-q")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, **PATIENT_LEASE})


@pytest.mark.slow
def test_two_workers_share_one_study_without_running_a_trial_twice(digits, tmp_path: Path) -> None:
    journal = tmp_path / "study.journal"
    workers = [run_worker(digits, journal, tmp_path / f"w{i}" / "best.pt", 10) for i in range(2)]
    for worker in workers:  # (ten trials on two shared cores: minutes on a busy machine)
        _, err = worker.communicate(timeout=1800)
        assert worker.returncode == 0, err
    trials = finished_trials(journal, "shared")
    numbers = [t.number for t in trials]
    assert len(numbers) == len(set(numbers))
    assert 10 <= len(trials) <= 11  # one shared budget of 10 (a worker may start one as the other finishes)


@pytest.mark.slow
def test_a_killed_run_resumes_without_redoing_finished_trials(cli, digits, tmp_path: Path) -> None:
    journal = tmp_path / "study.journal"
    worker = run_worker(digits, journal, tmp_path / "best.pt", 8)
    deadline = time.time() + 300
    while time.time() < deadline:
        if journal.exists() and len(finished_trials(journal, "shared")) >= 2:
            break
        time.sleep(0.5)
    os.kill(worker.pid, signal.SIGKILL)
    worker.wait()
    before = {t.number: t.user_attrs.get("description") for t in finished_trials(journal, "shared")}
    assert 2 <= len(before) < 8
    result = cli(*tune_args(digits, "--max-accuracy-drop", "0.5", "--trials", "8", "--backends",
                            "fusion,svd,torch-pruning", "--study", "shared", "--storage", journal,
                            "--output", tmp_path / "best.pt"))
    assert result.exit_code == 0, result.stderr
    assert f"resuming study 'shared': {len(before)} finished trials kept" in result.stderr
    after = {t.number: t.user_attrs.get("description") for t in finished_trials(journal, "shared")}
    assert len(after) == 8
    assert all(after[number] == description for number, description in before.items())


@pytest.mark.slow
def test_only_applicable_techniques_and_no_configuration_twice(cli, digits, tmp_path: Path) -> None:
    """A CNN gets no token merging (ViT only); the few configurations of a small space are each run once."""
    journal = tmp_path / "s.journal"
    result = cli(*tune_args(digits, "--max-accuracy-drop", "0.5", "--trials", "4", "--backends", "tome,fusion,svd",
                            "--study", "s", "--storage", journal, "--output", tmp_path / "b.pt", "--json", "-q"))
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    ran = [t for t in report["trials"] if t["state"] == "COMPLETE"]
    assert ran and not any("tome" in t["description"] for t in report["trials"])
    descriptions = [t["description"] for t in ran]
    assert len(descriptions) == len(set(descriptions))


def test_default_study_name_depends_on_the_settings(digits) -> None:
    from model_opt.autotune import default_study_name

    settings = {"objective": "latency", "max_accuracy_drop": 0.01, "device": "cpu", "backends": [],
                "higher_is_better": True}
    first = default_study_name(digits.model, settings)
    assert first.startswith("model-opt-model-")
    assert default_study_name(digits.model, {**settings, "objective": "size"}) != first
    assert default_study_name(digits.model, settings) == first
