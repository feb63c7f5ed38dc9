"""One job behind every entry point: check the inputs, load the model, plan, apply, and save.

``optimize``, ``autotune`` and ``recommend`` build a :class:`Job` from the model, the test script, the
dataset and a :class:`Settings` record; the seed API uses :func:`apply_step`. Each entry point adds only
what is its own.
"""

from __future__ import annotations

import contextlib
import fcntl
import math
import os
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from . import modelio
from .atomic import written_together
from .context import TechniqueContext
from .errors import DeviceError, ModelOptError, TechniqueError, UsageError, first_line
from .measure import timing_budget, to_device
from .modelinfo import run_checked
from .modules import linear_from_conv1d
from .plugins import PluginManager, get_plugin_manager
from .registry import KINDS, Technique
from .report import StepRecord
from .testscript import TestScript
from .timing import timing_choice

#: Suffixes of the files model-opt writes beside an artifact, or reads as other formats.
RESERVED_SUFFIXES = (".py", ".json", ".pt2", ".xml", ".bin", ".journal", ".png", ".log")
#: The most elements a random --input-shape may have (about 1 GiB of float32).
MAX_INPUT_ELEMENTS = 2**28


@dataclass
class Step:
    """One requested technique: kind plus optional backend/method names and raw option values."""

    kind: str
    backend: str | None = None
    method: str | None = None
    options: dict[str, Any] = field(default_factory=dict)


Planned = list[tuple[Technique, dict[str, Any]]]


def plan(steps: Sequence[Step], manager: PluginManager | None = None) -> Planned:
    """Resolve and validate every step (no model needed), sorted into pipeline order."""
    manager = manager or get_plugin_manager()
    resolved = []
    for step in sorted(steps, key=lambda s: KINDS.index(s.kind) if s.kind in KINDS else -1):
        technique = manager.registry.find(step.kind, step.backend, step.method)
        options = technique.resolve_options(step.options)
        technique.validate_environment()
        resolved.append((technique, options))
    return resolved


def check_device(device: str) -> str:
    import torch

    if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        raise UsageError(f"unknown device {device!r}", "choose one of: cpu, cuda")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise DeviceError("--device cuda was asked for, but no CUDA GPU is available here", "use --device cpu")
    return device


def check_needs(technique: Technique, context: TechniqueContext) -> None:
    label = technique.label
    if "cuda" in technique.needs and not context.device.startswith("cuda"):
        raise DeviceError(f"{label} runs only on a CUDA GPU", "use --device cuda on a machine with a GPU")
    if "example_input" in technique.needs:
        context.require_example_input(label)
    if "calibration_data" in technique.needs and context.calibration_data is None:
        context.require_calibration_data(label)
    if "train" in technique.needs and context.train is None:
        raise TechniqueError(f"{label} trains the model, and no train(model, dataset_path, steps) hook was given",
                             "define train() in the test script (CLI), or pass train=... (Python)")


def check_module_names(model: Any, planned: Planned) -> None:
    """Every name in an ``exclude`` option must name a module (or a prefix of one) of the model."""
    import difflib

    from .modules import excluded

    named_modules = getattr(model, "named_modules", None)
    if not callable(named_modules):  # not a torch module (another runtime): nothing to name
        return
    names = [name for name, _ in named_modules() if name]
    for technique, options in planned:
        for entry in options.get("exclude") or []:
            if not any(excluded(n, [entry]) for n in names):
                close = difflib.get_close_matches(entry, names, n=3, cutoff=0.5)
                hint = f"did you mean {', '.join(close)}?" if close else "use names from model.named_modules()"
                raise UsageError(f"{technique.label} exclude={entry} names no module of "
                                 "the model", hint)


def apply_step(model: Any, technique: Technique, options: dict[str, Any], context: TechniqueContext,
               manager: PluginManager | None = None) -> tuple[Any, StepRecord]:
    """Apply one technique through its plugin; a backend's own exception becomes a one-line error."""
    manager = manager or get_plugin_manager()
    context.technique = technique.label
    check_needs(technique, context)
    check_module_names(model, [(technique, options)])
    context.progress(f"applying {technique.kind} {technique.backend}:{technique.method}")
    started = time.perf_counter()
    try:
        result = manager.apply(technique, model, options, context)
    except ModelOptError as exc:
        exc.technique = technique.name  # which step failed, for the tuner
        raise
    except Exception as exc:  # a backend's own error: one line, unless debugging
        if os.environ.get("MODEL_OPT_DEBUG"):
            raise
        error = TechniqueError(f"{technique.backend} {technique.method} failed on this model "
                               f"({type(exc).__name__}: {first_line(exc)})",
                               "the input is untouched; set MODEL_OPT_DEBUG=1 to see the traceback")
        error.technique = technique.name
        raise error from None
    record = StepRecord(technique.kind, technique.backend, technique.method, technique.plugin, options,
                        result.info, time.perf_counter() - started, state=result.state or {},
                        replayable=result.state is not None and manager.can_restore(technique),
                        standalone=result.standalone)
    return result.model, record


def apply(model: Any, planned: Planned, context: TechniqueContext,
          manager: PluginManager | None = None, allow_unchanged: bool = False) -> tuple[Any, list[StepRecord]]:
    """Apply each planned technique in order; refuse a run in which no step changed anything (unless
    ``allow_unchanged``: other steps of the same run, applied separately, may)."""
    records = []
    for technique, options in planned:
        model, record = apply_step(model, technique, options, context, manager)
        records.append(record)
    unchanged = [r for r in records if r.info.get("changed") is False]
    if records and len(unchanged) == len(records) and not allow_unchanged:
        notes = "; ".join(f"{r.backend} {r.method}: {r.info.get('note', 'no change')}" for r in unchanged)
        raise TechniqueError(f"nothing was optimized ({notes})", "choose a technique or setting that applies "
                             "to this model (see model-opt techniques)")
    return model, records


def default_output(model_path: Path) -> Path:
    name = model_path.name if model_path.is_dir() else model_path.stem
    return model_path.with_name(f"{name}.optimized.pt")


def is_hf_folder(path: Path) -> bool:
    return path.is_dir() and (path / "config.json").is_file()


def output_target(model_path: str | os.PathLike[str], output: str | os.PathLike[str] | None) -> tuple[Path, bool]:
    """Where a run writes, and whether it writes a folder: a Hugging Face folder in gives a folder out (beside it,
    ``<name>.optimized``; for a Hub id, in the working directory), as does an ``output`` that ends in '/' or is a
    folder; else a file (``output``, or ``<name>.optimized.pt`` beside the model)."""
    given = Path(model_path)
    model_path = modelio.resolve_model_path(model_path)
    if not output:
        if model_path != given:  # a Hub id: its folder in the Hugging Face cache is no place to write
            return Path.cwd() / f"{given.name}.optimized", True
        if is_hf_folder(model_path):
            return model_path.with_name(f"{model_path.name}.optimized"), True
        return default_output(model_path), False
    text = os.fspath(output)
    named = Path(text.rstrip("/" + os.sep) or os.sep)
    if named.name in ("", ".", "..") or named.resolve().name == "":
        raise UsageError(f"--output {text} names a folder by a path with no name of its own (the working "
                         "directory, its parent, or the root)", "pass a new file or folder, e.g. --output out.pt "
                         "or --output out/")
    try:
        folder = Path(text).is_dir()
    except OSError:  # a name too long to look up: check_output says so
        folder = False
    return Path(text.rstrip("/" + os.sep) or text), folder or text.endswith(("/", os.sep))


def side_path(output: Path, suffix: str, folder: bool = False) -> Path:
    """A file beside the output, named after it: ``model.optimized.pt`` -> ``model.optimized.report.json``; a
    folder output ``model.optimized/`` -> ``model.optimized.report.json`` beside it."""
    return output.with_name(f"{output.name if folder else output.stem}{suffix}")


def report_path(output: Path, folder: bool = False) -> Path:
    """The report of a run, beside its output under the output's own name."""
    return side_path(output, ".report.json", folder)


def side_files(output: Path, folder: bool = False) -> list[Path]:
    """Every file a run may write beside its output: report, backend log, torch.export program, autotune plot,
    and for a file output the OpenVINO IR (a folder output holds it inside). Each is checked like the output
    itself before any work."""
    files = [side_path(output, suffix, folder) for suffix in (".report.json", ".log", ".pt2", ".pareto.png")]
    return files if folder else [*files, output.with_suffix(".xml"), output.with_suffix(".bin")]


def inputs_of(path: Path) -> list[Path]:
    """A model path and the files that belong to it (an OpenVINO IR's weights)."""
    return [path, *([path.with_suffix(".bin")] if path.suffix.lower() == ".xml" else [])]


def _same(a: Path, b: Path) -> bool:
    try:
        return a.resolve() == b.resolve() or (a.exists() and b.exists() and os.path.samefile(a, b))
    except OSError:
        return False


def owned_files(out: Path) -> set[str]:
    """Names of the side files an existing model-opt artifact at ``out`` says it wrote (replaceable by a rerun)."""
    if not modelio.is_artifact(out):
        return set()
    try:
        files = modelio.read_manifest(out).get("files", [])
    except ModelOptError:
        return set()
    return {f for f in files if isinstance(f, str)} if isinstance(files, list) else set()


def check_finite(value: float | None, flag: str) -> None:
    if value is not None and not math.isfinite(value):
        raise UsageError(f"{flag} is {value}, not a finite number", f"pass a number, e.g. {flag} 0.01")


def check_input_shape(shape: Sequence[int] | None) -> None:
    if shape and math.prod(shape) > MAX_INPUT_ELEMENTS:
        raise UsageError(f"--input-shape {','.join(map(str, shape))} has {math.prod(shape):,} elements, too many "
                         "for a random example input", "pass the shape of one real batch, e.g. 1,3,224,224")


def check_writable_folder(folder: Path, flag: str = "--output") -> None:
    """Fail before any work when the output cannot be written (the nearest existing folder is checked)."""
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise UsageError(f"{flag} folder {folder} cannot be made: {existing} is not a folder",
                         f"choose a {flag} in a folder you can write")
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as exc:
        raise UsageError(f"{flag} folder {existing} is not writable ({exc.strerror or exc})",
                         f"choose a {flag} in a folder you can write") from None


def check_output(out: Path, protected: Sequence[Path], export: bool = False, flag: str = "--output",
                 folder: bool = False) -> Path:
    """Refuse an output that would replace the user's files: the input, the test script, the data, an
    unrelated existing file or folder; or whose side files (report, log, IR, export, plot) would replace any of
    them. A ``folder`` output may be new, empty, or a folder an earlier run wrote, and holds no input."""
    if len(out.name.encode()) > 200:  # before touching the file system, which refuses such names
        raise UsageError(f"{flag} name {out.name[:40]}... is {len(out.name.encode())} bytes long, too long for the "
                         "files written beside it", f"choose a shorter {flag} name")
    if folder:
        check_output_folder(out, protected, flag)
    elif out.is_dir():
        raise UsageError(f"{flag} {out} is a folder", f"pass a file path, e.g. {flag} {out / 'model.optimized.pt'}")
    folders = [p.resolve() for p in protected if p.is_dir()]
    owned = owned_files(out)
    for path in [out, *side_files(out, folder)]:
        target = path.resolve()
        holder = next((p for p in folders if p in target.parents or p == target), None)
        if holder is not None:
            raise UsageError(f"{flag} {out} is inside {holder.name}/, an input folder",
                             f"choose a {flag} outside the model and dataset folders")
        if any(_same(path, p) for p in protected):
            what = "output" if path == out else f"file {path.name} (written beside the output)"
            raise UsageError(f"{flag} {out} would overwrite {path.name} with the {what}",
                             f"choose another {flag} path; model-opt never replaces its inputs")
        if path != out and (path.exists() or path.is_symlink()) and path.name not in owned:
            raise UsageError(f"{flag} {out} would replace {path.name} beside it, which model-opt did not write for "
                             "this output", f"choose another {flag} path, or move {path.name} away yourself")
    if folder:
        check_writable_folder(out.parent, flag)
        return out
    if out.suffix.lower() in RESERVED_SUFFIXES:
        raise UsageError(f"{flag} {out.name} ends in {out.suffix}, which model-opt uses for other files",
                         f"name the optimized model with .pt, e.g. {flag} {out.with_suffix('.pt')}")
    if (out.exists() or out.is_symlink()) and not (out.is_file() and not out.is_symlink() and modelio.is_artifact(out)):
        raise UsageError(f"{flag} {out} exists and is not a model-opt artifact",
                         "choose another path, or remove the file yourself")
    check_writable_folder(out.parent, flag)
    return out


def check_output_folder(out: Path, protected: Sequence[Path], flag: str) -> None:
    """A folder output is replaced whole: it must not hold (or be) an input, nor another folder of the user's."""
    target = out.resolve()
    for path in protected:
        if path.resolve() == target or target in path.resolve().parents:
            raise UsageError(f"{flag} {out} holds {path.name}, an input, and the output folder is replaced whole",
                             f"choose a new {flag} folder")
    try:
        modelio.check_replaceable_folder(out)
    except UsageError as exc:
        raise UsageError(f"{flag} {exc.problem}", exc.fix) from None


@contextlib.contextmanager
def output_lock(out: Path) -> Iterator[None]:
    """Hold an exclusive lock while a run writes its output and side files, so that two runs writing the
    same output one after the other leave a consistent set; the files are put in place together at the end."""
    import hashlib

    out.parent.mkdir(parents=True, exist_ok=True)
    locks = Path(tempfile.gettempdir()) / "model-opt-locks"  # never in the user's folder (a SIGKILL leaves it)
    locks.mkdir(exist_ok=True)
    key = hashlib.sha256(str(out.resolve()).encode()).hexdigest()[:32]
    lock_path = locks / f"{key}.lock"
    while True:
        handle = open(lock_path, "a+")  # noqa: SIM115
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            same = os.path.exists(lock_path) and os.stat(lock_path).st_ino == os.fstat(handle.fileno()).st_ino
        except OSError:
            same = False
        if same:
            break
        handle.close()  # another run removed the file we locked: lock the new one
    try:
        with written_together():  # the output and its side files appear together, or none of them
            yield
    finally:
        with contextlib.suppress(OSError):
            os.unlink(lock_path)
        handle.close()


#: The built-in evaluation of causal language models.
BUILTIN_LM = Path(__file__).parent / "builtin" / "lm_eval.py"


def builtin_script(model_path: str | os.PathLike[str], dataset: str | os.PathLike[str],
                   compiled: bool = False) -> TestScript:
    """The built-in evaluation when no test script is given: for a causal LM folder and a folder of text files."""
    from .builtin.lm_eval import settings, text_files

    folder = Path(model_path)
    config = modelio.read_config(folder) if folder.is_dir() else None
    if not (config is not None and modelio.is_causal_lm(config)):
        raise UsageError("--test-script is required for this model (model-opt evaluates causal language models "
                         "itself, and this is not one)", "pass --test-script eval.py (see README: the test script)")
    if Path(dataset).exists():  # (a missing dataset is said by the caller)
        text_files(dataset)
    settings()
    return TestScript(BUILTIN_LM, model_path=model_path, compiled=compiled)


def search_paths(model_path: Path, script: TestScript | None, trust_model: bool) -> list[Path]:
    """Folders importable while the model loads: the test script's; the model's own folder only when the
    user trusts the model (a file downloaded beside it must not shadow the user's modules), and after."""
    return [*([script.folder] if script else []), *([Path(model_path).parent] if trust_model else [])]


def open_model(model_path: Path, script: TestScript | None, trust_model: bool) -> Any:
    """The one way every command opens a model: the test script's ``load_model`` when it has one, else the
    safe formats (artifacts replayed, Hugging Face folders), with :func:`search_paths` importable."""
    loader = (lambda p: script.call("load_model", p)) if script is not None and script.has("load_model") else None
    return modelio.load(model_path, trust_model=trust_model, loader=loader,
                        search_paths=search_paths(model_path, script, trust_model))


@dataclass(frozen=True)
class Settings:
    """How a job runs, checked once by :meth:`check` (the budget, the shape, the device) for every command."""

    output: str | os.PathLike[str] | None = None
    device: str = "cpu"
    trust_model: bool = False
    input_shape: Sequence[int] | None = None
    compile: bool = False
    max_accuracy_drop: float | None = None
    export: bool = False
    finetune_steps: int = 0
    output_flag: str = "--output"

    @classmethod
    def of(cls, given: dict[str, Any], entry: str) -> Settings:
        """Settings from keyword arguments; an unknown name is a one-line error naming the known ones."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(given) - known)
        if unknown:
            from .registry import choose_one_of

            raise choose_one_of(f"{entry}() argument", unknown[0], known)
        return cls(**given)

    def check(self) -> Settings:
        """Everything that can be checked without the model; returns the settings with the device checked."""
        check_finite(self.max_accuracy_drop, "--max-accuracy-drop")
        if self.max_accuracy_drop is not None and self.max_accuracy_drop < 0:
            raise UsageError(f"--max-accuracy-drop must be 0 or more, not negative ({self.max_accuracy_drop:g})",
                             "pass the largest drop you accept, in the metric's units (e.g. 0.01)")
        if self.finetune_steps < 0:
            raise UsageError(f"--finetune-steps is {self.finetune_steps}", "pass 0 (no recovery) or a positive number")
        check_input_shape(self.input_shape)
        check_device(self.device)
        timing_choice(), timing_budget()  # the environment's timing settings, checked before any work
        return self


class Job:
    """A model, its test script and data, the device, and where the result goes.

    :meth:`prepare` checks everything that can be checked without the model; :meth:`load` opens the
    model and the inputs techniques need; :meth:`context` is what technique hooks receive.
    """

    def __init__(self, model_path: Path, script: TestScript, dataset: str, output: Path, settings: Settings,
                 progress: Callable[[str], None], manager: PluginManager) -> None:
        self.model_path, self.script, self.dataset, self.output = model_path, script, dataset, output
        self.settings, self.device = settings, settings.device
        self.trust_model, self.input_shape, self.compile = settings.trust_model, settings.input_shape, settings.compile
        self.max_accuracy_drop, self.say, self.manager = settings.max_accuracy_drop, progress, manager
        self.model: Any = None
        self.example: Any = None
        self.source: dict[str, Any] = {}
        self.prior_steps: list[dict[str, Any]] = []
        self.folder = False  # the output is a folder (Hugging Face layout), not a file

    @classmethod
    def prepare(cls, model_path: str | os.PathLike[str], *, test_script: str | os.PathLike[str] | None,
                dataset: str | os.PathLike[str], settings: Settings | None = None,
                progress: Callable[[str], None] | None = None, manager: PluginManager | None = None) -> Job:
        """Check the inputs and settings (before any heavy work) and make the job."""
        settings = (settings or Settings()).check()
        given, model_path = model_path, modelio.resolve_model_path(model_path)  # a Hub id: its cached folder
        script = TestScript(test_script, model_path=model_path, compiled=settings.compile) if test_script else \
            builtin_script(model_path, dataset, compiled=settings.compile)
        path = modelio.check_readable(model_path, allow_folder=script.has("load_model"))
        dataset = str(dataset)
        if not os.path.exists(dataset):
            raise UsageError(f"test dataset not found: {dataset}", "check the --test-dataset path")
        if settings.finetune_steps and not script.has("train"):
            raise UsageError(f"--finetune-steps needs a training hook, and {script.path.name} defines no "
                             "train(model, dataset_path, steps)", "add train() to the test script (see README)")
        out, folder = output_target(given, settings.output)
        protected = [*inputs_of(path), script.path, Path(dataset)]
        out = check_output(out, protected, export=settings.export, flag=settings.output_flag, folder=folder)
        job = cls(path, script, dataset, out, settings, progress or (lambda message: None),
                  manager or get_plugin_manager())
        job.folder = folder
        return job

    # -- the model and its inputs ------------------------------------------------------------
    def load(self) -> Any:
        """Open the model (state_dict via load_model, safe formats, artifacts replayed), on the device."""
        import torch

        self.say(f"loading {self.model_path.name}")
        model = open_model(self.model_path, self.script, self.trust_model)
        if not isinstance(model, torch.nn.Module):
            raise UsageError(f"{self.model_path.name} did not load as a torch.nn.Module", "check load_model()")
        self.source, self.prior_steps = self._source(self.script.has("load_model"))
        converted = linear_from_conv1d(model)
        if converted:  # recorded, so that a reopened result is rebuilt the same way
            self.source[modelio.CONV1D_AS_LINEAR] = True
            self.say(f"{len(converted)} transformers Conv1D layers are handled as the nn.Linear layers they are")
        self.model = model.to(self.device).eval()
        self.example = self._example_input()
        if self.example is not None:
            run_checked(self.model, self.example)
        return self.model

    def search_paths(self) -> list[Path]:
        """Folders importable while the model loads (see :func:`search_paths`)."""
        return search_paths(self.model_path, self.script, self.trust_model)

    def _source(self, via_loader: bool) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        """Where the architecture comes from when the result is reopened, and the steps already applied."""
        path = self.model_path
        if modelio.is_artifact(path):  # a model-opt output (file or folder): its source, and its steps kept
            manifest = modelio.read_manifest(path)
            source = manifest.get("source") if isinstance(manifest.get("source"), dict) else {}
            return dict(source), modelio.recorded_steps(manifest, path.name)
        opened_with = "load_model" if via_loader else ("folder" if path.is_dir() else "file")
        source: dict[str, Any] = {"path": str(path.resolve()), "opened_with": opened_with}
        if opened_with == "folder":  # the architecture, so that the output reopens without this folder
            source["config"] = modelio.read_config(path)
        return source, []

    def _example_input(self) -> Any:
        import torch

        script = self.script
        if script.has("example_input"):
            value = script.call("example_input", self.dataset)
        elif self.input_shape:
            value = torch.randn(*self.input_shape)
        elif script.has("calibration_data"):
            value = next(iter(script.call("calibration_data", self.dataset)), None)
        else:
            return None
        return to_device(value, self.device)

    def context(self) -> TechniqueContext:
        script, dataset = self.script, self.dataset
        return TechniqueContext(
            device=self.device, compile=self.compile, example_input=self.example,
            calibration_data=(lambda: script.call("calibration_data", dataset)) if script.has("calibration_data")
            else None,
            labelled_data=(lambda: script.call("labelled_data", dataset)) if script.has("labelled_data") else None,
            train=(lambda m, d, n: script.call("train", m, d, n)) if script.has("train") else None,
            dataset_path=dataset, progress=self.say,
            evaluate=lambda m: script.evaluate(m, dataset, self.device).value,
            max_accuracy_drop=self.max_accuracy_drop, higher_is_better=script.higher_is_better)

    def plan(self, steps: Sequence[Step]) -> Planned:
        return plan(steps, self.manager)

    def check(self, planned: Planned, context: TechniqueContext) -> None:
        """What the planned techniques need, checked on the loaded model before any work."""
        for technique, _ in planned:
            check_needs(technique, context)
        check_module_names(self.model, planned)

    # -- saving ------------------------------------------------------------------------------
    def save(self, model: Any, records: Sequence[StepRecord], extra: dict[str, Any] | None = None,
             path: Path | None = None, files: Sequence[str | os.PathLike[str]] = ()) -> Path:
        """Write the artifact (to the output, or ``path``): the recipe (source, every step with its replay
        state), the weights, and the names of the side files this run wrote beside it (``files``, and the backend
        log when it has something in it): a rerun may replace those, and no other file."""
        from .backend_output import claim_log

        written = [Path(f).name for f in files]
        if path is None and claim_log():
            written.append(side_path(self.output, ".log", self.folder).name)
        manifest = {
            "source": self.source,
            "files": sorted(set(written)),
            "steps": [*self.prior_steps, *(r.to_dict() for r in records)],
            "import_paths": [str(p.resolve()) for p in self.search_paths()],
            **(extra or {}),
        }
        if path is not None:
            return modelio.save(model, path, manifest)
        self.say(f"saving {self.output}")
        if self.folder:
            return modelio.save_folder(model, self.output, manifest, copy_from=self.model_path)
        return modelio.save(model, self.output, manifest)

    @contextlib.contextmanager
    def saved_candidates(self, candidates: dict[str, tuple[Any, Sequence[StepRecord], bool]]) -> Iterator[dict]:
        """Each candidate ``(model, records, compiled)`` saved to a temporary artifact, as a timing process
        reopens it (our own file, so trusted), beside the original opened from its file as this job did."""
        from .timing import Deployed

        with tempfile.TemporaryDirectory(prefix="model-opt-candidates-") as tmp:
            hooks = {"model_path": str(self.model_path.resolve()), "run_compiled": self.compile}
            saved = {"original": Deployed(str(self.model_path.resolve()), str(self.script.path), self.trust_model,
                                          **hooks)}
            for name, (model, records, compiled) in candidates.items():
                path = self.save(model, records, path=Path(tmp) / f"{name}.pt")
                saved[name] = Deployed(str(path), str(self.script.path), trust_model=True, compile=compiled, **hooks)
            yield saved

    def time_deployed(self, saved: dict[str, Any], rounds: int = 9) -> dict[str, Any]:
        """:func:`model_opt.timing.time_deployed` of saved candidates on this job's example and device."""
        from .timing import time_deployed

        return time_deployed(saved, self.example, self.device, rounds=rounds)
