"""Keep backends' chatter (warnings, log lines, progress bars, prints) out of the user's terminal: while a
run works, it goes to a log file beside the output, and model-opt's own progress lines still reach the
terminal."""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import sys
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import TextIO


@contextlib.contextmanager
def backend_output(log_path: Path, terminal: list[TextIO]) -> Iterator[None]:
    """Send sys.stdout/sys.stderr, Python warnings and every logging stream handler to ``log_path``
    (written only when the run succeeds and something was logged). ``terminal[0]`` is set to the real
    stderr, for progress."""
    succeeded = False
    terminal[:] = [sys.stderr]
    fd, tmp_name = tempfile.mkstemp(prefix="model-opt-", suffix=".log")  # moved beside the output at the end
    handle = os.fdopen(fd, "w", encoding="utf-8", buffering=1)
    moved: dict[int, tuple[logging.StreamHandler, TextIO]] = {}  # a handler may serve several loggers
    for handler in _stream_handlers():
        if id(handler) not in moved:
            moved[id(handler)] = (handler, handler.stream)
            handler.stream = handle  # (not setStream: it flushes the old stream, which may be closed)
    fallback = logging.lastResort
    logging.lastResort = logging.StreamHandler(handle)
    try:
        with contextlib.redirect_stdout(handle), contextlib.redirect_stderr(handle), warnings.catch_warnings():
            warnings.simplefilter("default")
            yield
        succeeded = True
    finally:
        for handler, stream in moved.values():
            handler.stream = stream
        for handler in _stream_handlers():  # made during the run (on sys.stderr, then our file): the terminal
            if handler.stream is handle:
                handler.stream = sys.__stderr__  # never closed, unlike a test runner's stream
        logging.lastResort = fallback
        handle.close()
        tmp = Path(tmp_name)
        if succeeded and tmp.stat().st_size and log_path.parent.is_dir():
            os.chmod(tmp, 0o666 & ~_umask())
            shutil.move(tmp, log_path)
        else:
            tmp.unlink()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _stream_handlers() -> list[logging.StreamHandler]:
    """Every handler that writes to a stream (not a file), on every logger."""
    loggers = [logging.getLogger(), *logging.root.manager.loggerDict.values()]
    return [handler for logger in loggers for handler in getattr(logger, "handlers", [])
            if isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler)]
