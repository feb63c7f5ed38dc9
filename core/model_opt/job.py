"""One job behind every entry point: the model, its test script and data, the settings, and where the result goes.

``optimize``, ``autotune`` and ``recommend`` build a :class:`Job` from the model, the test script, the dataset and
a :class:`Settings` record. :meth:`Job.prepare` checks everything that can be checked without the model;
:meth:`Job.load` opens the model and its example input; :meth:`Job.context` is what technique hooks receive;
:meth:`Job.save` writes the result's recipe and weights.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from .artifact.format import CONV1D_AS_LINEAR, is_artifact, read_manifest, recorded_steps
from .artifact.write import save, save_folder
from .backend_output import claim_log
from .context import TechniqueContext
from .errors import DeviceError, UsageError
from .measure import timing_budget, to_device
from .modelinfo import run_checked
from .modelio import check_readable, open_model, search_paths
from .modules import linear_from_conv1d
from .outputs import (
    check_output,
    check_sensitivity_output,
    inputs_of,
    output_target,
    sensitivity_target,
    side_path,
)
from .plugins import PluginManager, get_plugin_manager
from .recommend import detect_family
from .registry import choose_one_of
from .report import StepRecord
from .sources import read_config, resolve_model_path
from .testscript import TestScript, builtin_script, check_input_shape, example_input
from .timing import timing_choice


def check_device(device: str) -> str:
    import torch

    if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        raise UsageError(f"unknown device {device!r}", "choose one of: cpu, cuda")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise DeviceError("--device cuda was asked for, but no CUDA GPU is available here", "use --device cpu")
    return device


def check_finite(value: float | None, flag: str) -> None:
    if value is not None and not math.isfinite(value):
        raise UsageError(f"{flag} is {value}, not a finite number", f"pass a number, e.g. {flag} 0.01")


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
    #: What the job writes: a model (and its report), or a sensitivity measurement (JSON and chart).
    writes: str = "model"

    @classmethod
    def of(cls, given: dict[str, Any], entry: str) -> Settings:
        """Settings from keyword arguments; an unknown name is a one-line error naming the known ones."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(given) - known)
        if unknown:
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
    """A model, its test script and data, the device, and where the result goes (see the module)."""

    def __init__(self, model_path: Path, script: TestScript, dataset: str, output: Path, settings: Settings,
                 progress: Callable[[str], None], manager: PluginManager, folder_output: bool = False) -> None:
        self.model_path, self.script, self.dataset, self.output = model_path, script, dataset, output
        self.settings, self.device = settings, settings.device
        self.trust_model, self.input_shape, self.compile = settings.trust_model, settings.input_shape, settings.compile
        self.max_accuracy_drop, self.progress, self.manager = settings.max_accuracy_drop, progress, manager
        #: The output is a folder (Hugging Face layout), not a file.
        self.folder_output = folder_output
        self.model: Any = None
        self.example: Any = None
        self.family: str | None = None
        self.source: dict[str, Any] = {}
        self.prior_steps: list[dict[str, Any]] = []

    @classmethod
    def prepare(cls, model_path: str | os.PathLike[str], *, test_script: str | os.PathLike[str] | None,
                dataset: str | os.PathLike[str], settings: Settings | None = None,
                progress: Callable[[str], None] | None = None, manager: PluginManager | None = None) -> Job:
        """Check the inputs and settings (before any heavy work) and make the job."""
        settings = (settings or Settings()).check()
        given, model_path = model_path, resolve_model_path(model_path)  # a Hub id: its cached folder
        script = TestScript(test_script, model_path=model_path, compiled=settings.compile) if test_script else \
            builtin_script(model_path, dataset, compiled=settings.compile)
        path = check_readable(model_path, allow_folder=script.has("load_model"))
        dataset = str(dataset)
        if not os.path.exists(dataset):
            raise UsageError(f"test dataset not found: {dataset}", "check the --test-dataset path")
        if settings.finetune_steps and not script.has("train"):
            raise UsageError(f"--finetune-steps needs a training hook, and {script.path.name} defines no "
                             "train(model, dataset_path, steps)", "add train() to the test script (see README)")
        protected = [*inputs_of(path), script.path, Path(dataset)]
        if settings.writes == "sensitivity":
            out, folder_output = check_sensitivity_output(sensitivity_target(path, settings.output), protected), False
        else:
            out, folder_output = output_target(given, settings.output)
            out = check_output(out, protected, flag=settings.output_flag, folder=folder_output)
        return cls(path, script, dataset, out, settings, progress or (lambda message: None),
                   manager or get_plugin_manager(), folder_output)

    # -- the model and its inputs ------------------------------------------------------------
    def load(self) -> Any:
        """Open the model (state_dict via load_model, safe formats, artifacts replayed) on the device, its example
        input, and its architecture family."""
        import torch

        self.progress(f"loading {self.model_path.name}")
        model = open_model(self.model_path, self.script, self.trust_model)
        if not isinstance(model, torch.nn.Module):
            raise UsageError(f"{self.model_path.name} did not load as a torch.nn.Module", "check load_model()")
        self.source, self.prior_steps = self._source(self.script.has("load_model"))
        converted = linear_from_conv1d(model)
        if converted:  # recorded, so that a reopened result is rebuilt the same way
            self.source[CONV1D_AS_LINEAR] = True
            self.progress(f"{len(converted)} transformers Conv1D layers are handled as the nn.Linear layers they are")
        self.model = model.to(self.device).eval()
        self.family = detect_family(self.model)[0]
        self.example = self._example_input()
        if self.example is not None:
            run_checked(self.model, self.example)
        return self.model

    def _source(self, via_loader: bool) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        """Where the architecture comes from when the result is reopened, and the steps already applied."""
        path = self.model_path
        if is_artifact(path):  # a model-opt output (file or folder): its source, and its steps kept
            manifest = read_manifest(path)
            source = manifest.get("source") if isinstance(manifest.get("source"), dict) else {}
            return dict(source), recorded_steps(manifest, path.name)
        opened_with = "load_model" if via_loader else ("folder" if path.is_dir() else "file")
        source: dict[str, Any] = {"path": str(path.resolve()), "opened_with": opened_with}
        if opened_with == "folder":  # the architecture, so that the output reopens without this folder
            source["config"] = read_config(path)
        return source, []

    def _example_input(self) -> Any:
        value = example_input(self.script, self.dataset, self.input_shape)
        return None if value is None else to_device(value, self.device)

    def context(self) -> TechniqueContext:
        script, dataset = self.script, self.dataset
        return TechniqueContext(
            device=self.device, compile=self.compile, example_input=self.example, family=self.family,
            calibration_data=(lambda: script.call("calibration_data", dataset)) if script.has("calibration_data")
            else None,
            labelled_data=(lambda: script.call("labelled_data", dataset)) if script.has("labelled_data") else None,
            train=(lambda m, d, n: script.call("train", m, d, n)) if script.has("train") else None,
            dataset_path=dataset, progress=self.progress,
            evaluate=lambda m: script.evaluate(m, dataset, self.device).value,
            max_accuracy_drop=self.max_accuracy_drop, higher_is_better=script.higher_is_better,
            model_path=str(self.model_path))

    # -- saving ------------------------------------------------------------------------------
    def save(self, model: Any, records: Sequence[StepRecord], extra: dict[str, Any] | None = None,
             path: Path | None = None, files: Sequence[str | os.PathLike[str]] = ()) -> Path:
        """Write the artifact (to the output, or ``path``): the recipe (source, every step with its replay
        state), the weights, and the names of the side files this run wrote beside it (``files``, and the backend
        log when it has something in it): a rerun may replace those, and no other file."""
        written = [Path(f).name for f in files]
        if path is None and claim_log():
            written.append(side_path(self.output, ".log", self.folder_output).name)
        manifest = {
            "source": self.source,
            "files": sorted(set(written)),
            "steps": [*self.prior_steps, *(r.to_dict() for r in records)],
            "import_paths": [str(p.resolve()) for p in search_paths(self.model_path, self.script, self.trust_model)],
            **(extra or {}),
        }
        if path is not None:
            return save(model, path, manifest)
        self.progress(f"saving {self.output}")
        if self.folder_output:
            return save_folder(model, self.output, manifest, copy_from=self.model_path)
        return save(model, self.output, manifest)
