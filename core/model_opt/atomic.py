"""Write files so that a crash, Ctrl-C or kill never leaves a partial output behind.

Each file goes to a temporary file beside its target and is renamed over it when complete. Inside
:func:`written_together`, the renames wait until every file of the group is complete and then happen
together with SIGINT/SIGTERM held, so an output never appears without its report and side files.
A temporary file left by a process that was killed outright (SIGKILL) is removed by the next write
of the same target.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
import signal
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

_PENDING: contextvars.ContextVar[list[tuple[Path, Path]] | None] = contextvars.ContextVar("model_opt_pending",
                                                                                           default=None)


class InterruptedAfterSave(KeyboardInterrupt):
    """Ctrl-C or SIGTERM arrived while a group of files was being put in place: they were all written."""

    def __init__(self, written: list[Path]) -> None:
        super().__init__(f"interrupted after writing {', '.join(map(str, written))}")
        self.written = written


def _temp_prefix(target: Path) -> str:
    return f".{target.name}."


def _remove_stale(target: Path) -> None:
    """Temporary files of ``target`` whose writing process is gone (killed with SIGKILL)."""
    remove_stale_temp(target.parent, _temp_prefix(target), ".")


def remove_stale_temp(folder: Path, prefix: str, separator: str = "-") -> None:
    """Remove ``folder``'s entries named ``<prefix><pid><separator>...`` whose process is gone: temporary files
    and folders that a killed run (SIGKILL) could not clean up."""
    import shutil

    with contextlib.suppress(OSError):
        for entry in folder.iterdir():
            name = entry.name
            if not name.startswith(prefix):
                continue
            pid = name[len(prefix):].split(separator, 1)[0]
            if pid.isdigit() and not _alive(int(pid)):
                with contextlib.suppress(OSError):
                    shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside ``target``; on success it is renamed over ``target`` (at the end of the
    enclosing :func:`written_together`, if any).

    On any exception (KeyboardInterrupt included) the temporary file is removed and ``target``
    is left as it was.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale(target)
    fd, tmp_name = tempfile.mkstemp(prefix=f"{_temp_prefix(target)}{os.getpid()}.", suffix=f".tmp{target.suffix}",
                                    dir=target.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the mode any new file would get
        pending = _PENDING.get()
        if pending is not None:
            pending.append((tmp, target))
        else:
            os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise


@contextlib.contextmanager
def atomic_folder(target: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield an empty temporary folder beside ``target``; on success it replaces ``target`` (a folder an earlier
    run wrote) whole, at the end of the enclosing :func:`written_together`, if any. On any exception the
    temporary folder is removed and ``target`` is left as it was."""
    import shutil

    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale(target)
    tmp = Path(tempfile.mkdtemp(prefix=f"{_temp_prefix(target)}{os.getpid()}.", suffix=".tmp", dir=target.parent))
    try:
        yield tmp
        os.chmod(tmp, 0o777 & ~_umask())
        pending = _PENDING.get()
        if pending is not None:
            pending.append((tmp, target))
        else:
            put_in_place(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def put_in_place(tmp: Path, target: Path) -> None:
    """Rename ``tmp`` over ``target``; a folder replaces an existing folder whole (the old one is moved aside
    first, then removed)."""
    import shutil

    if not (tmp.is_dir() and target.is_dir() and not target.is_symlink()):
        os.replace(tmp, target)
        return
    old = target.with_name(f"{_temp_prefix(target)}{os.getpid()}.old")
    os.replace(target, old)
    os.replace(tmp, target)
    shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def written_together() -> Iterator[list[Path]]:
    """Files written with :func:`atomic_path` inside this block appear together at its end, or not at all.
    Yields the list of targets put in place (filled at the end)."""
    if _PENDING.get() is not None:  # inside another group: its end puts these files in place too
        yield []
        return
    pending: list[tuple[Path, Path]] = []
    done: list[Path] = []
    token = _PENDING.set(pending)
    try:
        yield done
    except BaseException:
        import shutil

        for tmp, _ in pending:
            if tmp.is_dir():
                shutil.rmtree(tmp, ignore_errors=True)
            with contextlib.suppress(FileNotFoundError, IsADirectoryError):
                tmp.unlink()
        raise
    finally:
        _PENDING.reset(token)
    caught: list[int] = []
    held = (signal.SIGINT, signal.SIGTERM)
    main = threading.current_thread() is threading.main_thread()
    previous = {sig: signal.signal(sig, lambda signum, frame: caught.append(signum)) for sig in held} if main else {}
    try:
        for tmp, target in pending:
            put_in_place(tmp, target)
            done.append(target)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if caught:
        raise InterruptedAfterSave(done)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_text_atomic(target: str | os.PathLike[str], text: str) -> Path:
    """Write ``text`` to ``target`` atomically; returns ``target``."""
    with atomic_path(target) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(target)
