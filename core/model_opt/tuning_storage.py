"""Optuna storage for the tuner: a journal file by default, or a database URL shared by workers.

- Passwords in URLs are redacted wherever a URL is shown or saved.
- On a database, trials carry Optuna's heartbeat; a worker killed mid-trial leaves a trial that a later
  worker marks failed and retries (RetryFailedTrialCallback).
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

#: Seconds between heartbeats, and after which a silent RUNNING trial is taken as dead.
HEARTBEAT_S = int(os.environ.get("MODEL_OPT_HEARTBEAT_S", "10"))
GRACE_S = int(os.environ.get("MODEL_OPT_GRACE_S", "30"))
LEASE_ATTR = "model_opt_lease"


def redact(url: str | None) -> str:
    """The URL with its password replaced by ***."""
    if not url:
        return str(url)
    return re.sub(r"(://[^:/@]+:)[^@]*@", r"\1***@", url)


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
    label = redact(storage)
    last: BaseException | None = None
    for attempt in range(6):
        try:
            return optuna.storages.RDBStorage(
                storage, engine_kwargs={"pool_pre_ping": True}, heartbeat_interval=HEARTBEAT_S,
                grace_period=GRACE_S,
                heartbeat_stale_trial_callback=optuna.storages.RetryFailedTrialCallback(max_retry=2)), label
        except Exception as exc:  # noqa: PERF203 - retried on purpose
            module = _missing_driver(exc)
            if module:
                raise UsageError(f"the storage {label} needs the Python module {module}, which is not installed",
                                 'pip install "model-opt[postgres]" (psycopg2 for postgresql:// URLs)') from None
            last = exc
            racing = any(word in str(exc) for word in ("already exists", "UniqueViolation", "duplicate key"))
            if not racing:
                break
            time.sleep(0.3 + random.random() * (attempt + 1))  # another worker is creating the schema
    detail = redact(first_line(last, 160)) if last else ""
    raise UsageError(f"cannot reach the storage {label} ({detail})",
                     "check the URL, the server and its credentials; no trial was run")


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

    def renew() -> None:
        while not stop.is_set():
            with contextlib.suppress(Exception):
                trial.set_user_attr(LEASE_ATTR, {"worker": worker_id(), "alive": time.time()})
            stop.wait(HEARTBEAT_S)

    thread = threading.Thread(target=renew, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=5)


def expire_dead_trials(study: Any) -> list[int]:
    """Fail the RUNNING journal trials whose lease expired (their worker was killed) and queue their
    parameters again; returns their numbers."""
    import optuna

    if not is_journal(study._storage):
        return []  # databases: Optuna's heartbeat does this
    expired = []
    now = time.time()
    for trial in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        held = trial.user_attrs.get(LEASE_ATTR)
        alive = held.get("alive", 0) if isinstance(held, dict) else (
            trial.datetime_start.timestamp() if trial.datetime_start else 0)
        if now - alive > GRACE_S:
            study._storage.set_trial_state_values(trial._trial_id, optuna.trial.TrialState.FAIL)
            if trial.params:
                study.enqueue_trial(trial.params, user_attrs={"retry_of": trial.number})
            expired.append(trial.number)
    return expired
