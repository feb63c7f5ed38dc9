"""User-facing errors: each one names the problem and the fix on a single line."""

from __future__ import annotations


def first_line(exc: BaseException, limit: int = 200) -> str:
    """The first line of an exception's message (its type's name when it has none), at most ``limit`` long."""
    lines = str(exc).strip().splitlines()
    return lines[0][:limit] if lines else type(exc).__name__


def describe(exc: BaseException, limit: int = 200) -> str:
    """``Type: first line`` of an exception, for one-line errors that wrap a backend's."""
    return f"{type(exc).__name__}: {first_line(exc, limit)}"


def printable(text: str, limit: int = 1000) -> str:
    """``text`` safe for a terminal: control characters (escape sequences) shown escaped, cut to ``limit``."""
    safe = "".join(c if c.isprintable() or c == " " else repr(c)[1:-1] for c in text)
    return safe if len(safe) <= limit else safe[:limit] + "..."


class ModelOptError(Exception):
    """Base error. ``str(err)`` is the one-line message the CLI prints."""

    exit_code = 1

    def __init__(self, problem: str, fix: str | None = None) -> None:
        self.problem = problem.rstrip(".")
        self.fix = fix
        message = self.problem if not fix else f"{self.problem}; {fix}"
        super().__init__(printable(" ".join(message.split()), 2000))


class UsageError(ModelOptError):
    """Bad arguments: unknown technique, option, value out of range."""

    exit_code = 2


class BackendNotInstalled(ModelOptError):
    """The technique's plugin or its backend package is not installed."""


class ModelLoadError(ModelOptError):
    """The model file cannot be read, or is not a model."""


class TestScriptError(ModelOptError):
    """The user's test script is missing, malformed, or failed."""

    __test__ = False  # not a pytest test class


class DeviceError(ModelOptError):
    """The requested device is not available."""


class TechniqueError(ModelOptError):
    """A technique could not be applied to this model."""


class AccuracyBudgetExceeded(ModelOptError):
    """The optimized model lost more of the metric than --max-accuracy-drop allows."""

    def __init__(self, problem: str, fix: str | None = None, report: object | None = None) -> None:
        super().__init__(problem, fix)
        self.report = report
