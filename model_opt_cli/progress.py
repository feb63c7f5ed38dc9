"""Progress for long steps: a live rich line (spinner, elapsed time, and a bar for counted steps such as
autotune's ``[3/20]`` trials) on a terminal, plain ``model-opt: ...`` lines anywhere else."""

from __future__ import annotations

import contextlib
import re
from collections.abc import Callable, Iterator
from typing import IO, Any

COUNTED = re.compile(r"^\[(\d+)/(\d+)\]\s*")


@contextlib.contextmanager
def progress_display(stream: IO[str], quiet: bool, terminal: bool | None = None) -> Iterator[Callable[[str], None]]:
    """Yield the callback that shows a progress message: each message finishes the previous step's line."""
    from model_opt.redaction import redact

    if quiet:
        yield lambda message: None
        return
    terminal = stream.isatty() if terminal is None else terminal
    if not terminal:
        yield lambda message: print(f"model-opt: {redact(message)}", file=stream, flush=True)
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    console = Console(file=stream, force_terminal=True)
    columns: list[Any] = [SpinnerColumn(), TextColumn("{task.description}"), BarColumn(),
                          MofNCompleteColumn(), TimeElapsedColumn()]
    with Progress(*columns, console=console, transient=True) as bar:
        task = bar.add_task("model-opt", total=None)

        def show(message: str) -> None:
            message = redact(message)
            counted = COUNTED.match(message)
            console.print(f"model-opt: {message}", markup=False, highlight=False, soft_wrap=True)
            if counted:
                done, total = int(counted.group(1)), int(counted.group(2))
                bar.update(task, description="trials", completed=done, total=total)
            else:
                bar.update(task, description=message[:60], completed=0, total=None)

        yield show
