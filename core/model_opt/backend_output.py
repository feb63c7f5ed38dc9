"""Keep backends' chatter (warnings, log lines, progress bars, prints) out of the user's terminal: while a
run works, it goes to a log file beside the output, and model-opt's own progress lines still reach the
terminal."""

from __future__ import annotations

import contextlib
import contextvars
import logging
import os
import shutil
import sys
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TextIO

#: The backend log of the run in progress: its file handle, and whether the saved output claimed it.
_LOG: contextvars.ContextVar[dict[str, Any] | None] = contextvars.ContextVar("model_opt_backend_log", default=None)


def claim_log() -> bool:
    """While the output is saved: whether this run's backend log has something in it (it will then be written
    beside the output, and the output's recipe lists it); marks it as claimed."""
    log = _LOG.get()
    if log is None:
        return False
    log["handle"].flush()
    log["claimed"] = os.fstat(log["handle"].fileno()).st_size > 1  # (a lone newline says nothing)
    return log["claimed"]


@contextlib.contextmanager
def backend_output(log_path: Path, terminal: list[TextIO]) -> Iterator[list[Path]]:
    """Send sys.stdout/sys.stderr, Python warnings and every logging stream handler to ``log_path``
    (written only when the run succeeds and something was logged). ``terminal[0]`` is set to the real
    stderr, for progress. Yields a list that holds, after the block, where the log was written: beside the
    output, or (when a file of that name is there and the output did not claim the name) in the temp folder."""
    succeeded = False
    written: list[Path] = []
    terminal[:] = [sys.stderr]
    from .atomic import remove_stale_temp

    remove_stale_temp(Path(tempfile.gettempdir()), "model-opt-log-")  # left by runs that were killed
    fd, tmp_name = tempfile.mkstemp(prefix=f"model-opt-log-{os.getpid()}-", suffix=".log")  # moved beside the output
    handle = os.fdopen(fd, "w", encoding="utf-8", buffering=1)
    moved: dict[int, tuple[logging.StreamHandler, TextIO]] = {}  # a handler may serve several loggers
    for handler in _stream_handlers():
        if id(handler) not in moved:
            moved[id(handler)] = (handler, handler.stream)
            handler.stream = handle  # (not setStream: it flushes the old stream, which may be closed)
    fallback = logging.lastResort
    logging.lastResort = logging.StreamHandler(handle)
    state = {"handle": handle, "claimed": False}
    token = _LOG.set(state)
    try:
        with contextlib.redirect_stdout(handle), contextlib.redirect_stderr(handle), stdout_fd_to(handle.fileno()), \
                warnings.catch_warnings():
            warnings.simplefilter("default")
            yield written
        succeeded = True
    finally:
        for handler, stream in moved.values():
            handler.stream = stream
        for handler in _stream_handlers(handle):  # made during the run (on sys.stderr, then our file): the terminal
            if handler.stream is handle:
                handler.stream = sys.__stderr__  # never closed, unlike a test runner's stream
        logging.lastResort = fallback
        _LOG.reset(token)
        handle.close()
        tmp = Path(tmp_name)
        if not (succeeded and tmp.stat().st_size > 1):
            tmp.unlink()
        elif log_path.parent.is_dir() and (state["claimed"] or not (log_path.exists() or log_path.is_symlink())):
            os.chmod(tmp, 0o666 & ~_umask())  # (prepare checked its name)
            shutil.move(tmp, log_path)
            written.append(log_path)
        else:  # a file the output did not claim is there: it is not replaced
            written.append(tmp)


@contextlib.contextmanager
def stdout_fd_to(fd: int) -> Iterator[None]:
    """Point file descriptor 1 at ``fd`` while the block runs: code that writes to fd 1 directly (C libraries,
    ``os.write(1, ...)``, a child process inheriting it) cannot break the report printed on stdout."""
    for stream in (sys.stdout, sys.__stdout__):
        with contextlib.suppress(Exception):
            stream.flush()
    try:
        saved = os.dup(1)
    except OSError:  # no fd 1 at all
        yield
        return
    os.dup2(fd, 1)
    try:
        yield
    finally:
        _flush_c_stdio()
        os.dup2(saved, 1)
        os.close(saved)


def _flush_c_stdio() -> None:
    import ctypes

    with contextlib.suppress(Exception):
        ctypes.CDLL(None).fflush(None)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _stream_handlers(*also: object) -> list[logging.StreamHandler]:
    """Every handler that writes to the terminal (sys.stdout/sys.stderr, or the streams ``also`` names), on
    every logger.

    Only those: a StreamHandler subclass that manages a file of its own (torch's ``LazyTraceHandler`` opens
    its trace file lazily and, seeing a stream it did not open, closes it as if inherited across a fork) must
    keep its stream, or it closes our log file under whoever writes to it next."""
    terminal = {id(s) for s in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__, *also) if s is not None}
    loggers = [logging.getLogger(), *logging.root.manager.loggerDict.values()]
    return [handler for logger in loggers for handler in getattr(logger, "handlers", [])
            if isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler)
            and id(getattr(handler, "stream", None)) in terminal]
