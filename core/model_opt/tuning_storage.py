"""Optuna storage for the tuner: a journal file by default, or a database URL shared by workers.

- Passwords in URLs are redacted wherever a URL is shown or saved (:mod:`model_opt.redaction`).
- On a database, trials carry Optuna's heartbeat; a worker killed mid-trial leaves a trial that a later
  worker marks failed and retries (RetryHeartbeatStaleTrialCallback).
- Optuna 5's JournalStorage has no heartbeat, so journal trials carry a lease of our own (worker and
  last-alive time in the trial's user attributes, renewed by a thread while the trial runs); a later
  worker fails and re-enqueues trials whose lease has expired.
- Two workers creating the schema of a fresh database at the same moment race inside Optuna; the loser
  retries.
"""

from __future__ import annotations

import contextlib
import os
import random
import re
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .errors import UsageError, describe, first_line
from .redaction import check_url, redact

LEASE_ATTR = "model_opt_lease"
#: A study name becomes a file name (the journal): letters, digits, '.', '_' and '-', at most this long.
STUDY_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")


def _seconds(variable: str, default: int) -> int:
    """A whole number of seconds, at least 1, from the environment (else a one-line error)."""
    text = os.environ.get(variable, str(default)).strip()
    if not text.isdigit() or int(text) < 1 or int(text) > 86400:
        raise UsageError(f"{variable}={text[:20]!r} is not a whole number of seconds from 1 to 86400",
                         f"set it like {variable}={default}, or unset it")
    return int(text)


def heartbeat_s() -> int:
    """Seconds between heartbeats (MODEL_OPT_HEARTBEAT_S, default 10)."""
    return _seconds("MODEL_OPT_HEARTBEAT_S", 10)


def grace_s() -> int:
    """Seconds after which a silent RUNNING trial is taken as dead (MODEL_OPT_GRACE_S, default 30; at least
    twice the heartbeat)."""
    grace, beat = _seconds("MODEL_OPT_GRACE_S", 30), heartbeat_s()
    if grace < 2 * beat:
        raise UsageError(f"MODEL_OPT_GRACE_S={grace} is shorter than two heartbeats ({beat}s each), so live trials "
                         "would be failed", f"set MODEL_OPT_GRACE_S to at least {2 * beat}")
    return grace


def check_study_name(name: str) -> str:
    if not STUDY_NAME.match(name):
        raise UsageError(f"--study {name[:40]!r}{'...' if len(name) > 40 else ''} is not a valid study name (it "
                         "names the journal file)", "use up to 100 letters, digits, '.', '_' or '-', e.g. --study "
                         "resnet-tune")
    return name


#: Driver modules a URL may need, and what installs them (SQLAlchemy 2's default for postgresql:// is psycopg 3).
DRIVER_HINTS = {
    "psycopg": 'pip install "model-opt[postgres]" (psycopg 3, which postgresql:// URLs use)',
    "psycopg2": 'pip install psycopg2-binary, or write the URL as postgresql:// to use psycopg 3 '
                '(pip install "model-opt[postgres]")',
    "MySQLdb": "pip install mysqlclient, or write the URL as mysql+pymysql:// and pip install pymysql",
    "pymysql": "pip install pymysql",
}


def _missing_driver(exc: BaseException) -> str | None:
    """The database driver module whose import failed, searched through the exception's causes."""
    seen: BaseException | None = exc
    while seen is not None:
        match = re.search(r"No module named '([\w.]+)'", f"{seen}")
        if match:
            return match.group(1)
        seen = seen.__cause__ or seen.__context__
    return None


def open_storage(storage: str | None, default_path: Path) -> tuple[Any, str]:
    """An Optuna storage, checked before any trial; returns it with its redacted label."""
    import optuna

    if storage is None or "://" not in storage:
        return _journal(Path(storage) if storage else default_path)
    check_url(storage)
    label = redact(storage)
    last: BaseException | None = None
    for attempt in range(6):
        try:
            return optuna.storages.RDBStorage(
                storage, engine_kwargs={"pool_pre_ping": True}, heartbeat_interval=heartbeat_s(),
                grace_period=grace_s(),
                heartbeat_stale_trial_callback=_retry_callback()), label
        except Exception as exc:  # noqa: PERF203 - retried on purpose
            module = _missing_driver(exc)
            if module:
                hint = DRIVER_HINTS.get(module.split(".")[0], 'pip install "model-opt[postgres]" for PostgreSQL, '
                                        "or the driver the URL names")
                raise UsageError(f"the storage {label} needs the Python module {module}, which is not installed",
                                 hint) from None
            last = exc
            racing = any(word in str(exc) for word in ("already exists", "UniqueViolation", "duplicate key"))
            if not racing:
                break
            time.sleep(0.3 + random.random() * (attempt + 1))  # another worker is creating the schema
    detail = redact(first_line(last, 160)) if last else ""
    raise UsageError(f"cannot reach the storage {label} ({detail})",
                     "check the URL, the server and its credentials; no trial was run")


def _retry_callback() -> Any:
    """Optuna's callback that queues a trial again when its worker's heartbeat stopped (at most twice)."""
    import warnings

    import optuna

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=2)


def _journal(path: Path) -> tuple[Any, str]:
    import optuna
    from optuna.storages.journal import JournalFileBackend, JournalFileOpenLock

    if path.exists() and not path.is_file():
        raise UsageError(f"the journal {path} is not a file", "pass a journal file path or a database URL")
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        _check_journal(path)
        storage = optuna.storages.JournalStorage(JournalFileBackend(str(path), lock_obj=JournalFileOpenLock(
            str(path))))
        storage.get_all_studies()
    except Exception as exc:
        raise UsageError(f"{path} is not an Optuna journal ({describe(exc, 120)})",
                         "pass another --storage file, or remove the damaged one") from None
    return storage, str(path)


def _check_journal(path: Path) -> None:
    """Every line of an existing journal is an Optuna log entry (checked before anything is appended)."""
    import json

    if not path.exists():
        return
    with open(path, encoding="utf-8", errors="replace") as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                entry = json.loads(line)
            except ValueError:
                raise ValueError(f"line {number} is not JSON") from None
            if not (isinstance(entry, dict) and "op_code" in entry):
                raise ValueError(f"line {number} is not an Optuna log entry")


def is_journal(storage: Any) -> bool:
    import optuna

    return isinstance(storage, optuna.storages.JournalStorage)


def worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


@contextlib.contextmanager
def lease(trial: Any) -> Iterator[None]:
    """Renew this trial's lease while it runs (journal storage, which has no heartbeat of its own)."""
    stop = threading.Event()
    every = heartbeat_s()

    def renew() -> None:
        while not stop.is_set():
            with contextlib.suppress(Exception):
                trial.set_user_attr(LEASE_ATTR, {"worker": worker_id(), "alive": time.time()})
            stop.wait(every)

    thread = threading.Thread(target=renew, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=5)


def expire_dead_trials(study: Any) -> list[int]:
    """Fail the RUNNING trials whose worker stopped beating (it was killed) and queue their parameters again;
    returns their numbers. Journals: our lease; databases: Optuna's heartbeat (fail_stale_trials, whose
    retry callback queues them)."""
    import warnings

    import optuna

    if not is_journal(study._storage):
        running = {t._trial_id: t.number for t in study.get_trials(deepcopy=False,
                                                                    states=(optuna.trial.TrialState.RUNNING,))}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # experimental-API note
            optuna.storages.fail_stale_trials(study)
        return [number for trial_id, number in running.items()
                if study._storage.get_trial(trial_id).state == optuna.trial.TrialState.FAIL]
    expired = []
    now, grace = time.time(), grace_s()
    for trial in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        held = trial.user_attrs.get(LEASE_ATTR)
        alive = held.get("alive", 0) if isinstance(held, dict) else (
            trial.datetime_start.timestamp() if trial.datetime_start else 0)
        if now - alive > grace:
            study._storage.set_trial_state_values(trial._trial_id, optuna.trial.TrialState.FAIL)
            if trial.params:
                study.enqueue_trial(trial.params, user_attrs={"retry_of": trial.number})
            expired.append(trial.number)
    return expired


def open_study(storage: str | None, journal: Path, name: str, directions: list[str]) -> tuple[Any, str]:
    """The study ``name`` in ``storage`` (default: the ``journal`` file), made when new: (study, shown label)."""
    import optuna

    optuna_storage, label = open_storage(storage, journal)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        study = optuna.create_study(study_name=name, storage=optuna_storage, directions=directions,
                                    sampler=optuna.samplers.TPESampler(seed=None), load_if_exists=True)
    except Exception as exc:  # a damaged journal, a study made by another tool with other directions, ...
        what = f"{label} is not an Optuna journal" if is_journal(optuna_storage) else \
            f"study {name!r} cannot be opened in {label}"
        raise UsageError(f"{what} ({type(exc).__name__}: {redact(first_line(exc, 120))})",
                         "pass another --storage or --study") from None
    return study, label
