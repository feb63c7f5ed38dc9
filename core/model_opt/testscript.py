"""The user's test script, in either of its two contracts.

1. In-process: the script defines ``evaluate(model, dataset_path) -> float | dict[str, float]`` and
   optionally ``load_model(path)``, ``example_input(dataset_path)``, ``calibration_data(dataset_path)``,
   ``train(model, dataset_path, steps)`` and ``HIGHER_IS_BETTER``. Any of these functions may also take the
   keyword parameters ``model_path`` (the MODEL path given to model-opt: a file or a Hugging Face folder, e.g.
   to open its tokenizer; the original input also when an optimized model is evaluated) and ``compiled``
   (whether the run was asked to measure under ``--compile``).
2. As a program: ``python eval.py`` with ``MODEL_OPT_MODEL`` (a ``torch.save``-d module),
   ``MODEL_OPT_DATASET`` and ``MODEL_OPT_DEVICE`` set (and ``MODEL_OPT_MODEL_PATH``, the MODEL given to
   model-opt); every stdout line ``name = number`` is a metric.

Which one is detected from the script's source (a top-level ``def evaluate``) without running it.
"""

from __future__ import annotations

import ast
import contextlib
import importlib.util
import math
import os
import re
import subprocess
import sys
import tempfile
import traceback
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

from .errors import ModelOptError, TestScriptError, UsageError

#: The folder of model-opt's built-in evaluations (used when no test script is given).
BUILTIN_FOLDER = Path(__file__).resolve().parent / "builtin"
#: The built-in evaluation of causal language models.
BUILTIN_LM = BUILTIN_FOLDER / "lm_eval.py"
METRIC_LINE = re.compile(r"^\s*([A-Za-z_][\w.\-/@ ]*?)\s*[=:]\s*([-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)\s*%?\s*$")


@dataclass
class Metrics:
    """Named metric values and which one is primary."""

    values: dict[str, float]
    primary: str

    @property
    def value(self) -> float:
        return self.values[self.primary]


def parse_metrics(stdout: str) -> dict[str, float]:
    values: dict[str, float] = {}
    for line in stdout.splitlines():
        match = METRIC_LINE.match(line)
        if match:
            values[match.group(1).strip()] = float(match.group(2))
    return values


def pick_primary(values: dict[str, float]) -> str:
    return "accuracy" if "accuracy" in values else next(iter(values))


def _die_with_parent() -> None:
    """In the evaluation child: be killed when model-opt dies (even by SIGKILL), on Linux."""
    import ctypes
    import signal

    with contextlib.suppress(Exception):
        ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGKILL))  # PR_SET_PDEATHSIG


class HardExit(BaseException):
    """``os._exit`` called by the user's script while model-opt runs it in-process."""


@contextlib.contextmanager
def no_hard_exit() -> Iterator[None]:
    """While the user's code runs in our process, ``os._exit(n)`` raises instead of ending model-opt silently
    (with exit code 0 and no output)."""
    original = os._exit

    def refuse(code: int = 0) -> None:
        raise HardExit(f"os._exit({code}) was called")

    os._exit = refuse  # type: ignore[assignment]
    try:
        yield
    finally:
        os._exit = original


class TestScript:
    """A test script on disk; see the module docstring for the two contracts."""

    __test__ = False

    def __init__(self, path: str | os.PathLike[str], *, model_path: str | os.PathLike[str] | None = None,
                 compiled: bool = False) -> None:
        """``model_path``: the MODEL the user gave (passed to every hook that takes ``model_path``);
        ``compiled``: whether the run measures under --compile (passed to hooks that take ``compiled``)."""
        path = Path(path)
        if not path.exists():
            raise TestScriptError(f"test script not found: {path}", "check the --test-script path")
        if path.is_dir() or path.suffix != ".py":
            raise TestScriptError(f"test script must be a .py file: {path}", "pass the path of your eval.py")
        self.path = path.resolve()
        try:
            tree = ast.parse(self.path.read_text(encoding="utf-8"), filename=str(self.path))
        except SyntaxError as exc:
            raise TestScriptError(f"{path.name} has a syntax error at line {exc.lineno}: {exc.msg}",
                                  "fix the script") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise TestScriptError(f"cannot read test script {path}: {exc}", "check the file") from None
        self.defined = {
            node.name for node in tree.body if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
        } | {
            target.id for node in tree.body if isinstance(node, ast.Assign)
            for target in node.targets if isinstance(target, ast.Name)
        }
        self.constants: dict[str, Any] = {}
        for node in tree.body:
            if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
                try:
                    self.constants[node.targets[0].id] = ast.literal_eval(node.value)
                except ValueError:
                    pass
        self.mode = "in_process" if "evaluate" in self.defined else "program"
        self._module: ModuleType | None = None
        #: The MODEL path of the run, passed to the script's functions that take ``model_path``.
        self.model_path: str | None = os.fspath(model_path) if model_path is not None else None
        #: Whether the run measures compiled (--compile), passed to the functions that take ``compiled``.
        self.compiled = compiled
        #: The share of its data evaluate() may use (``sensitivity --eval-fraction``), passed when it takes
        #: ``fraction`` (and to a program as MODEL_OPT_EVAL_FRACTION); None: all of it.
        self.fraction: float | None = None

    @property
    def folder(self) -> Path:
        return self.path.parent

    @property
    def builtin(self) -> bool:
        """Whether this is model-opt's own evaluation (no script of the user's)."""
        return self.path.parent == BUILTIN_FOLDER

    def has(self, hook: str) -> bool:
        """True when the script offers ``hook`` in-process (program-mode scripts are never imported)."""
        return self.mode == "in_process" and hook in self.defined

    def as_deployed(self, model: Any, runnable: Any = None) -> Any:
        """What evaluate() is handed to measure ``model`` as deployed: ``runnable`` (e.g. the compiled model)
        where given and the script runs the very model it is handed (in-process, and its evaluate() does not
        take ``compiled`` to compile on its own), else ``model``."""
        if runnable is None or not self.has("evaluate") or takes(self.module.evaluate, "compiled"):
            return model
        return runnable

    # -- in-process ------------------------------------------------------------------------
    @property
    def module(self) -> ModuleType:
        """Import the script once, under its own name so that classes defined in it pickle."""
        if self._module is None:
            name = self.path.stem
            existing = sys.modules.get(name)
            if existing is not None and getattr(existing, "__file__", None) != str(self.path):
                name = f"model_opt_testscript_{name}"
            spec = importlib.util.spec_from_file_location(name, self.path)
            assert spec and spec.loader
            module = importlib.util.module_from_spec(spec)
            if str(self.folder) not in sys.path:
                sys.path.insert(0, str(self.folder))
            sys.modules[name] = module
            try:
                with no_hard_exit():
                    spec.loader.exec_module(module)
            except BaseException as exc:
                sys.modules.pop(name, None)
                if isinstance(exc, KeyboardInterrupt):
                    raise
                raise TestScriptError(f"{self.path.name} failed to import: {self._describe(exc)}",
                                      "fix the script") from None
            self._module = module
        return self._module

    @property
    def higher_is_better(self) -> bool:
        if "HIGHER_IS_BETTER" in self.constants:
            value = self.constants["HIGHER_IS_BETTER"]
        elif self.mode == "in_process" and "HIGHER_IS_BETTER" in self.defined:
            value = getattr(self.module, "HIGHER_IS_BETTER", True)
        else:
            return True
        if not isinstance(value, bool):
            raise TestScriptError(f"{self.path.name} sets HIGHER_IS_BETTER = {value!r}, which is not True or False",
                                  "write HIGHER_IS_BETTER = True or HIGHER_IS_BETTER = False (no quotes)")
        return value

    def call(self, hook: str, *args: Any) -> Any:
        """Call one of the script's functions; its own error is shown on one line (``os._exit`` included)."""
        function = getattr(self.module, hook, None)
        if function is None:
            raise TestScriptError(f"{self.path.name} defines no {hook}()", f"add {hook} to the script")
        offered = {"model_path": self.model_path, "compiled": self.compiled, "fraction": self.fraction}
        kwargs = {name: value for name, value in offered.items() if value is not None and takes(function, name)}
        try:
            with no_hard_exit():
                return function(*args, **kwargs)
        except KeyboardInterrupt:
            raise
        except ModelOptError:  # (model-opt's own, the built-in evaluation's included: they name their fix)
            raise
        except BaseException as exc:
            if self.builtin:
                raise TestScriptError(f"model-opt's built-in evaluation ({hook}) failed on this model: "
                                      f"{self._describe(exc)}", "pass --test-script with an evaluate() of your own"
                                      ) from None
            raise TestScriptError(f"{self.path.name} {hook}() raised {self._describe(exc)}",
                                  "fix the script, or the model/data it was given") from None

    def _describe(self, exc: BaseException) -> str:
        frames = [f for f in traceback.extract_tb(exc.__traceback__) if f.filename == str(self.path)]
        where = f" (line {frames[-1].lineno})" if frames else ""
        text = str(exc).strip().splitlines()
        return f"{type(exc).__name__}: {text[0] if text else ''}{where}"

    # -- both contracts --------------------------------------------------------------------
    def evaluate(self, model: Any, dataset: str, device: str = "cpu") -> Metrics:
        if self.mode == "in_process":
            result = self.call("evaluate", model, dataset)
            values = self._normalize(result)
        else:
            values = self._run_program(model, dataset, device)
        return Metrics(values, pick_primary(values))

    def _normalize(self, result: Any) -> dict[str, float]:
        if isinstance(result, dict):
            items = list(result.items())
        else:
            items = [("metric", result)]
        values: dict[str, float] = {}
        for name, value in items:
            try:
                number = float(value)
            except Exception:
                raise TestScriptError(
                    f"{self.path.name} evaluate() returned {type(value).__name__} {value!r} for {name!r}, "
                    "not a number", "return a float or a dict of floats") from None
            if not math.isfinite(number):
                raise TestScriptError(f"{self.path.name} evaluate() returned {number} for {name!r}",
                                      "return a finite number; check the model's outputs and the metric")
            values[str(name)] = number
        if not values:
            raise TestScriptError(f"{self.path.name} evaluate() returned no metric",
                                  "return a float or a dict of floats")
        return values

    def _run_program(self, model: Any, dataset: str, device: str) -> dict[str, float]:
        import torch

        from .atomic import remove_stale_temp

        remove_stale_temp(Path(tempfile.gettempdir()), "model-opt-eval-")  # copies left by killed runs
        with tempfile.TemporaryDirectory(prefix=f"model-opt-eval-{os.getpid()}-") as tmp:
            model_file = Path(tmp) / "model.pt"
            torch.save(model, model_file)
            env = {**os.environ, "MODEL_OPT_MODEL": str(model_file), "MODEL_OPT_DATASET": str(dataset),
                   "MODEL_OPT_DEVICE": device, **({"MODEL_OPT_MODEL_PATH": self.model_path} if self.model_path
                                                   else {}),
                   **({"MODEL_OPT_EVAL_FRACTION": str(self.fraction)} if self.fraction is not None else {})}
            env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(self.folder), env.get("PYTHONPATH", "")]))
            proc = subprocess.run([sys.executable, str(self.path)], env=env, capture_output=True, text=True,
                                  preexec_fn=_die_with_parent)
        if proc.returncode != 0:
            lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
            last = lines[-1].strip() if lines else f"no error output (exit code {proc.returncode})"
            raise TestScriptError(f"{self.path.name} exited with code {proc.returncode}: {last}",
                                  "fix the script, or run it by hand with the MODEL_OPT_* variables set")
        values = parse_metrics(proc.stdout)
        if not values:
            raise TestScriptError(
                f"{self.path.name} defines no evaluate(model, dataset_path) and printed no metric",
                "define evaluate(), or print lines like 'accuracy = 0.93'")
        for name, number in values.items():
            if not math.isfinite(number):
                raise TestScriptError(f"{self.path.name} printed {name} = {number}",
                                      "print finite numbers; check the model's outputs and the metric")
        return values


def takes(function: Any, name: str) -> bool:
    """Whether a test-script function declares the parameter ``name`` (by keyword)."""
    import inspect

    try:
        parameter = inspect.signature(function).parameters.get(name)
    except (TypeError, ValueError):
        return False
    return parameter is not None and parameter.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD,
                                                         inspect.Parameter.KEYWORD_ONLY)


#: The most elements a random --input-shape may have (about 1 GiB of float32).
MAX_INPUT_ELEMENTS = 2**28


def check_input_shape(shape: Sequence[int] | None) -> None:
    if shape and math.prod(shape) > MAX_INPUT_ELEMENTS:
        raise UsageError(f"--input-shape {','.join(map(str, shape))} has {math.prod(shape):,} elements, too many "
                         "for a random example input", "pass the shape of one real batch, e.g. 1,3,224,224")


def example_input(script: TestScript | None, dataset: str | None, input_shape: Sequence[int] | None) -> Any:
    """The example input every command times, traces and exports with: the test script's ``example_input``, else a
    random one of ``input_shape``, else the first calibration item; None when there is none."""
    import torch

    if script is not None and script.has("example_input"):
        if dataset is None:
            raise UsageError("the test script's example_input() needs --test-dataset", "pass --test-dataset")
        return script.call("example_input", dataset)
    if input_shape:
        check_input_shape(input_shape)
        return torch.randn(*input_shape)
    if script is not None and script.has("calibration_data") and dataset is not None:
        return next(iter(script.call("calibration_data", dataset)), None)
    return None


def builtin_script(model_path: str | os.PathLike[str], dataset: str | os.PathLike[str],
                   compiled: bool = False) -> TestScript:
    """The built-in evaluation when no test script is given: for a causal LM folder and a folder of text files."""
    from .builtin.lm_eval import settings, text_files
    from .hf import is_causal_lm
    from .sources import read_config

    folder = Path(model_path)
    config = read_config(folder) if folder.is_dir() else None
    if not (config is not None and is_causal_lm(config)):
        raise UsageError("--test-script is required for this model (model-opt evaluates causal language models "
                         "itself, and this is not one)", "pass --test-script eval.py (see README: the test script)")
    if Path(dataset).exists():  # (a missing dataset is said by the caller)
        text_files(dataset)
    settings()
    return TestScript(BUILTIN_LM, model_path=model_path, compiled=compiled)
