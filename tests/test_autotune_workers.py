"""Tuner workers on a real PostgreSQL 15 server and on the journal: started at the same instant, killed
mid-trial, resumed; exact trial counts, nothing left RUNNING; driver, password and journal errors."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from postgres import binaries, create_database, postgres_server

pytestmark = pytest.mark.slow  # real pretrained models / a real database, many processes
FAST_LEASE = {"MODEL_OPT_HEARTBEAT_S": "1", "MODEL_OPT_GRACE_S": "3"}
BACKENDS = "fusion,svd,torch-pruning"


@pytest.fixture(scope="module")
def server():
    if binaries() is None:
        pytest.skip("PostgreSQL server binaries are not installed (.ci/run installs them)")
    with postgres_server() as running:
        yield running


def worker(digits, storage: str, out: Path, trials: int, study: str = "shared",
           lease: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "model_opt_cli.main", "autotune", str(digits.model), "--test-dataset",
         str(digits.dataset), "--test-script", str(digits.script), "--max-accuracy-drop", "0.5", "--trials",
         str(trials), "--backends", BACKENDS, "--study", study, "--storage", storage, "--output", str(out)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, **(lease or FAST_LEASE)})


def trials_of(storage: str, study: str = "shared") -> list:
    import optuna

    if "://" in storage:
        backend = optuna.storages.RDBStorage(storage)
    else:
        from optuna.storages.journal import JournalFileBackend, JournalFileOpenLock

        backend = optuna.storages.JournalStorage(JournalFileBackend(storage, JournalFileOpenLock(storage)))
    try:
        return optuna.load_study(study_name=study, storage=backend).get_trials(deepcopy=False)
    except KeyError:
        return []


def counted(trials: list) -> list:
    return [t for t in trials if t.state.name in ("COMPLETE", "PRUNED") and "skipped" not in t.user_attrs]


def test_workers_started_at_the_same_instant_on_a_fresh_database(server, digits, tmp_path: Path) -> None:
    url = create_database(*server[:1], server[1], "fresh")
    workers = [worker(digits, url, tmp_path / f"w{i}" / "best.pt", 6) for i in range(3)]
    for proc in workers:
        _, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err
    trials = trials_of(url)
    assert 6 <= len(counted(trials)) <= 8  # one budget; a worker may start one as another finishes
    assert not [t for t in trials if t.state.name == "RUNNING"]


def _kill_mid_trial(proc: subprocess.Popen, storage: str) -> None:
    deadline = time.time() + 300
    while time.time() < deadline:
        trials = trials_of(storage)
        if len(counted(trials)) >= 1 and any(t.state.name == "RUNNING" for t in trials):
            break
        time.sleep(0.2)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()


@pytest.mark.parametrize("kind", ["postgres", "journal"])
def test_a_worker_killed_mid_trial_is_retried_and_nothing_stays_running(server, digits, tmp_path: Path, kind):
    storage = create_database(*server[:1], server[1], "killed") if kind == "postgres" else \
        str(tmp_path / "study.journal")
    proc = worker(digits, storage, tmp_path / "best.pt", 5)
    _kill_mid_trial(proc, storage)
    stuck = [t.number for t in trials_of(storage) if t.state.name == "RUNNING"]  # may be none: trials are fast
    time.sleep(4)  # past the grace period
    rerun = worker(digits, storage, tmp_path / "best.pt", 5)
    _, err = rerun.communicate(timeout=600)
    assert rerun.returncode == 0, err
    trials = trials_of(storage)
    assert not [t for t in trials if t.state.name == "RUNNING"]
    assert len(counted(trials)) == 5
    assert {t.number for t in trials if t.state.name == "FAIL"} >= set(stuck)  # a killed trial is failed


@pytest.mark.parametrize("kind", ["postgres", "journal"])
def test_a_rerun_inside_the_grace_period_waits_for_the_killed_trial(server, digits, tmp_path: Path, kind):
    """The rerun reaches its budget before the killed trial goes stale: it must wait, fail it, and run what the
    budget still needs, so that the count is exact and nothing stays RUNNING."""
    storage = create_database(*server[:1], server[1], "killed_now") if kind == "postgres" else \
        str(tmp_path / "study.journal")
    # longer than the rerun takes to reach its budget (each trial is timed against the original, as deployed)
    lease = {"MODEL_OPT_HEARTBEAT_S": "1", "MODEL_OPT_GRACE_S": "90"}
    proc = worker(digits, storage, tmp_path / "best.pt", 4, lease=lease)
    _kill_mid_trial(proc, storage)
    stuck = [t.number for t in trials_of(storage) if t.state.name == "RUNNING"]
    rerun = worker(digits, storage, tmp_path / "best.pt", 4, lease=lease)  # at once, inside the grace period
    _, err = rerun.communicate(timeout=600)
    assert rerun.returncode == 0, err
    trials = trials_of(storage)
    assert not [t for t in trials if t.state.name == "RUNNING"]
    assert len(counted(trials)) == 4
    assert {t.number for t in trials if t.state.name == "FAIL"} >= set(stuck)
    if stuck:
        assert "waiting for trial" in err


def test_password_never_shown_or_saved(server, digits, tmp_path: Path, cli) -> None:
    url = create_database(*server[:1], server[1], "secret").replace("postgres@", "postgres:s3cr3t@")
    out = tmp_path / "best.pt"
    result = cli("autotune", digits.model, "--test-dataset", digits.dataset, "--test-script", digits.script,
                 "--max-accuracy-drop", "0.5", "--trials", "2", "--backends", "torch-pruning", "--storage", url,
                 "--output", out, "--json")
    assert result.exit_code == 0, result.stderr
    assert "s3cr3t" not in result.stdout + result.stderr
    assert "s3cr3t" not in (tmp_path / "best.report.json").read_text()
    import zipfile

    assert "s3cr3t" not in zipfile.ZipFile(out).read("model_opt.json").decode()
    assert "postgres:***@" in json.loads(result.stdout)["storage"]


@pytest.mark.parametrize(("storage", "message"), [
    ("postgresql+pg8000://u:pw@127.0.0.1:1/x", "needs the Python module pg8000, which is not installed; pip install "
                                               "\"model-opt[postgres]\""),
    ("postgresql://u:pw@127.0.0.1:1/x", "cannot reach the storage postgresql://u:***@127.0.0.1:1/x"),
    ("mysql://u:pw@127.0.0.1:1/x", "needs the Python module MySQLdb, which is not installed; pip install mysqlclient"),
])
def test_storage_errors(cli, digits, tmp_path: Path, storage: str, message: str) -> None:
    result = cli("autotune", digits.model, "--test-dataset", digits.dataset, "--test-script", digits.script,
                 "--max-accuracy-drop", "0.1", "--storage", storage, "--output", tmp_path / "o.pt", "-q")
    assert result.exit_code != 0
    assert message in result.stderr and "pw@" not in result.stderr
    assert not (tmp_path / "o.pt").exists()


@pytest.mark.parametrize(("url", "shown"), [
    ("postgresql://:pw@host/db", "postgresql://:***@host/db"),
    ("postgresql://user:p@ss@host/db", "postgresql://user:***@host/db"),
    ("postgresql://host/db?user=u&password=pw", "postgresql://host/db?user=u&password=***"),
    ("failed: postgresql://u:pw@h:1/x timed out", "failed: postgresql://u:***@h:1/x timed out"),
])
def test_passwords_are_redacted_whatever_the_url_shape(url: str, shown: str) -> None:
    from model_opt.redaction import redact

    assert redact(url) == shown
    assert "pw" not in redact(url).replace("password", "") and "ss@" not in redact(url)


@pytest.mark.parametrize(("password", "char"), [("pa?ss", "?"), ("pa ss", " "), ("pa@ss", "@"), ("pa%ss", "%")])
def test_a_password_a_url_cannot_hold_raw_is_refused_unshown(cli, digits, tmp_path: Path, password: str,
                                                             char: str) -> None:
    """Drivers split such URLs elsewhere than we do (part of the password shown as a host): refused before any work,
    with the password hidden whole."""
    result = cli("autotune", digits.model, "--test-dataset", digits.dataset, "--test-script", digits.script,
                 "--max-accuracy-drop", "0.1", "--storage", f"postgresql://user:{password}@127.0.0.1:1/db",
                 "--output", tmp_path / "o.pt", "-q")
    assert result.exit_code == 2
    assert f"holds {char!r}, which a URL must write percent-encoded" in result.stderr
    assert "postgresql://user:***@127.0.0.1:1/db" in result.stderr
    assert not any(part in result.stderr for part in ("pa?", "pa ", "pa@", "pa%", "?ss", " ss@", "ss@127"))
    assert list(tmp_path.iterdir()) == []


def test_a_remembered_password_is_hidden_in_a_drivers_own_words() -> None:
    from model_opt.redaction import redact, remember

    remember("postgresql://user:s3cr%40t@db-host/optuna")
    assert redact('FATAL: password authentication failed ("s3cr@t" for user "user")') == \
        'FATAL: password authentication failed ("***" for user "user")'
    assert redact("dsn: user=user password=s3cr%40t host=db-host") == "dsn: user=user password=*** host=db-host"


def test_a_file_that_is_not_a_journal(cli, digits, tmp_path: Path) -> None:
    bad = tmp_path / "notes.journal"
    bad.write_text("this is not an optuna journal\n")
    result = cli("autotune", digits.model, "--test-dataset", digits.dataset, "--test-script", digits.script,
                 "--max-accuracy-drop", "0.1", "--storage", bad, "--output", tmp_path / "o.pt", "-q")
    assert result.exit_code != 0
    assert "notes.journal is not an Optuna journal" in result.stderr
    assert bad.read_text() == "this is not an optuna journal\n"


def test_another_objective_on_an_existing_study_is_refused(cli, digits, tmp_path: Path) -> None:
    journal = tmp_path / "s.journal"
    common = ["autotune", digits.model, "--test-dataset", digits.dataset, "--test-script", digits.script,
              "--max-accuracy-drop", "0.5", "--trials", "2", "--backends", "torch-pruning", "--study", "s",
              "--storage", journal, "--output", tmp_path / "b.pt", "-q"]
    assert cli(*common).exit_code == 0
    result = cli(*common, "--objective", "size")
    assert result.exit_code == 2
    assert "study 's' was run with objective 'latency'; this run asks for 'size'; pass another --study" \
        in result.stderr
