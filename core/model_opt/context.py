"""What a technique hook receives besides the model and its options."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from .errors import TechniqueError


def _quiet(message: str) -> None:
    pass


@dataclass
class TechniqueContext:
    """Device, inputs and hooks available to a technique.

    A model input has one of three forms everywhere: a tensor, a tuple of positional tensors, or a dict
    of keyword tensors (:func:`model_opt.measure.call_model` calls a model on any of them).
    ``calibration_data`` is a zero-argument callable that returns a fresh iterable of model inputs (so a
    technique can pass over it more than once); ``labelled_data`` likewise returns ``(inputs, labels)``
    pairs, for gradient criteria; ``train`` is the test script's
    ``train(model, dataset_path, steps)`` hook when it defines one. ``evaluate(model)`` returns the
    user's primary metric (for accuracy-aware techniques), with ``max_accuracy_drop`` the budget in the
    metric's units and ``higher_is_better`` its direction.
    """

    device: str = "cpu"
    compile: bool = False
    example_input: Any = None
    calibration_data: Callable[[], Iterable[Any]] | None = None
    labelled_data: Callable[[], Iterable[tuple[Any, Any]]] | None = None
    train: Callable[..., Any] | None = None
    dataset_path: str | None = None
    progress: Callable[[str], None] = _quiet
    evaluate: Callable[[Any], float] | None = None
    max_accuracy_drop: float | None = None
    higher_is_better: bool = True
    #: The technique being applied (``backend method``), set by the core: what the require_* errors name.
    technique: str = ""
    #: The model's architecture family as the core detected it (cnn, vit, hybrid, diffusion, transformer,
    #: causal-lm; :func:`model_opt.recommend.detect_family`), for techniques whose settings depend on it.
    family: str | None = None
    #: The model's own file or folder (the CLI's MODEL), for techniques that read files beside the weights (a
    #: causal LM's tokenizer); None for a model given in Python.
    model_path: str | None = None

    def require_example_input(self, technique: str | None = None) -> Any:
        technique = technique or self.technique
        if self.example_input is None:
            raise TechniqueError(
                f"{technique} needs an example input to trace the model",
                "pass example_input=... (Python) or define example_input(dataset_path) in the test script "
                "(CLI), or give --input-shape",
            )
        return self.example_input

    def require_calibration_data(self, technique: str | None = None) -> Iterable[Any]:
        technique = technique or self.technique
        if self.calibration_data is None:
            raise TechniqueError(
                f"{technique} needs calibration data",
                "define calibration_data(dataset_path) in the test script (an iterable of model inputs)",
            )
        return self.calibration_data()

    def calibration_inputs(self, technique: str | None = None) -> Iterable[Any]:
        """The calibration items: each one a model input (tensor, tuple of positional tensors, or dict)."""
        return self.require_calibration_data(technique)

    def require_labelled_data(self, technique: str | None = None) -> Iterable[tuple[Any, Any]]:
        technique = technique or self.technique
        if self.labelled_data is None:
            raise TechniqueError(
                f"{technique} needs a loss, and no labelled data was given",
                "define labelled_data(dataset_path) in the test script, yielding (inputs, labels) pairs",
            )
        return self.labelled_data()

    def train_for(self, model: Any, steps: int, why: str) -> Any:
        """Train ``model`` ``steps`` steps with the test script's ``train(model, dataset_path, steps)`` (``why``
        names what the training is for, in the error when there is no train()); returns the trained model (the
        one train() returned, else ``model``, trained in place). An exception in train() is the usual one-line
        error."""
        from torch import nn

        if self.train is None:
            raise TechniqueError(f"{self.technique} {why} with your train(), and the test script defines none",
                                 "add train(model, dataset_path, steps) to the test script (CLI), or pass "
                                 "train=... (Python)")
        self.progress(f"{self.technique}: {why} ({steps} steps of your train())")
        trained = self.train(model, self.dataset_path, steps)
        return trained if isinstance(trained, nn.Module) else model
