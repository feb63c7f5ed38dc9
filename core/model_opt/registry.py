"""Typed technique records and the registry that resolves names to them."""

from __future__ import annotations

import difflib
import importlib.util
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from .device import CAPABILITIES, slow_here
from .errors import BackendNotInstalled, UsageError

#: The kinds of technique, in pipeline order; each has its hook (model_opt.hookspecs).
KINDS: tuple[str, ...] = ("prune", "decompose", "fuse", "quantize")


def extras() -> set[str]:
    """The extras the model-opt distribution declares (first-party plugins), read from its metadata."""
    from importlib.metadata import PackageNotFoundError, metadata

    try:
        return set(metadata("model-opt").get_all("Provides-Extra") or [])
    except PackageNotFoundError:
        return set()


def plugin_extras() -> set[str]:
    """The extras that install a first-party plugin (an extra named <name> that requires the model-opt-<name>
    distribution, and perhaps the backend's runtime beside it), read from model-opt's metadata: no list kept by
    hand."""
    import re
    from importlib.metadata import PackageNotFoundError, requires

    try:
        lines = requires("model-opt") or []
    except PackageNotFoundError:
        return set()
    found: dict[str, set[str]] = {}
    for line in lines:
        match = re.match(r"^([A-Za-z0-9_.-]+).*;\s*extra\s*==\s*['\"]([^'\"]+)['\"]", line)
        if match:
            found.setdefault(match.group(2), set()).add(match.group(1).lower())
    return {extra for extra, names in found.items() if f"model-opt-{extra}" in names}


def install_hint(name: str) -> str:
    """How to install ``name``: an extra of model-opt (first-party plugins), else a distribution's name."""
    return f'pip install "model-opt[{name}]"' if name in extras() else f'pip install "{name}"'


@dataclass(frozen=True)
class Recommended:
    """A technique's own recommendation for an architecture family: why, with which options, how early.

    Plugins declare it in their techniques (``Technique.recommended``); :func:`model_opt.recommend.recommend`
    gives copies with the technique filled in and whether it can run here (``available``, else ``missing``:
    what is missing and how to install it)."""

    family: str
    why: str
    options: dict[str, Any] = field(default_factory=dict, hash=False, compare=False)
    rank: int = 50  # lower comes first in the recommendations
    technique: Technique | None = field(default=None, hash=False, compare=False)
    available: bool = True
    missing: str = ""
    #: Why it is slow on this device (a capability its technique needs to be fast and this device lacks), or "".
    slow: str = ""


def step_name(step: Mapping[str, Any]) -> str:
    """``kind:backend:method`` of a step record (as :attr:`Technique.name` names its technique)."""
    return f"{step['kind']}:{step['backend']}:{step['method']}"


def closest(name: str, choices: Iterable[str]) -> str:
    """' (did you mean X?)' when a choice is close to ``name``, else ''."""
    match = difflib.get_close_matches(name, list(choices), n=1, cutoff=0.5)
    return f" (did you mean {match[0]!r}?)" if match else ""


def choose_one_of(what: str, name: str, choices: Iterable[str]) -> UsageError:
    choices = sorted(set(choices))
    listed = ", ".join(choices) if choices else "none installed"
    return UsageError(f"unknown {what} {name!r}{closest(name, choices)}", f"choose one of: {listed}")


@dataclass(frozen=True)
class Option:
    """One typed option of a technique. ``type`` is one of bool, int, float, str, list."""

    name: str
    type: type
    default: Any
    help: str = ""
    choices: tuple[Any, ...] = ()
    minimum: float | None = None
    maximum: float | None = None
    exclusive_minimum: bool = False
    exclusive_maximum: bool = False
    #: Former names, still accepted for one release with a deprecation note.
    aliases: tuple[str, ...] = ()
    #: A kind-level command-line flag for this option (e.g. ``--prune-amount``), shared by every technique of
    #: the kind that declares it; without one the option is passed as ``--<kind>-opt name=value``.
    flag: str | None = None

    def describe_range(self) -> str:
        if self.minimum is None and self.maximum is None:
            return ""
        lo = "(" if self.exclusive_minimum else "["
        hi = ")" if self.exclusive_maximum else "]"
        low = "-inf" if self.minimum is None else f"{self.minimum:g}"
        high = "inf" if self.maximum is None else f"{self.maximum:g}"
        return f"{lo}{low}, {high}{hi}"

    def coerce(self, value: Any, where: str = "") -> Any:
        """Convert a CLI string or Python value to this option's type and check it."""
        label = f"{where}option {self.name!r}"
        if value is None:
            return None
        try:
            if self.type is bool:
                if isinstance(value, str):
                    lowered = value.strip().lower()
                    if lowered not in {"1", "0", "true", "false", "yes", "no", "on", "off"}:
                        raise ValueError(value)
                    value = lowered in {"1", "true", "yes", "on"}
                value = bool(value)
            elif self.type is list:
                if isinstance(value, str):
                    value = [part.strip() for part in value.split(",") if part.strip()]
                value = list(value)
            elif self.type is int:
                if isinstance(value, float) and not value.is_integer():
                    raise ValueError(value)
                value = int(value)
            elif self.type is float:
                value = float(value)
            else:
                value = self.type(value)
        except (TypeError, ValueError):
            raise UsageError(
                f"{label} expects {self.type.__name__}, got {value!r}",
                f"pass a {self.type.__name__}" + (f" in {self.describe_range()}" if self.minimum is not None
                                                 or self.maximum is not None else ""),
            ) from None
        if self.choices:
            items = value if isinstance(value, list) else [value]
            for item in items:
                if item not in self.choices:
                    raise choose_one_of(f"{label} value", str(item), map(str, self.choices))
        if isinstance(value, float) and not math.isfinite(value):
            raise UsageError(f"{label} is {value}, not a finite number",
                             f"pass a number{' in ' + self.describe_range() if self.describe_range() else ''}")
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            too_low = self.minimum is not None and (
                value <= self.minimum if self.exclusive_minimum else value < self.minimum)
            too_high = self.maximum is not None and (
                value >= self.maximum if self.exclusive_maximum else value > self.maximum)
            if too_low or too_high:
                raise UsageError(f"{label} is {value:g}, outside {self.describe_range()}",
                                 f"pass a value in {self.describe_range()}")
        return value


@dataclass(frozen=True)
class Technique:
    """What a plugin registers: one method of one backend for one kind of optimization."""

    kind: str
    backend: str
    method: str
    summary: str
    options: tuple[Option, ...] = ()
    needs: tuple[str, ...] = ()
    requires: tuple[str, ...] = ()
    speeds_up: tuple[str, ...] = ("cpu", "cuda")
    speeds_up_compiled: tuple[str, ...] = ()
    speed_note: str = ""
    #: ``{option: {value: devices}}``: an option value under which the technique reduces latency on those devices
    #: too (NNCF weight compression with ``runtime=openvino`` runs OpenVINO's int4/int8 kernels on the CPU).
    speeds_up_with: dict[str, dict[Any, tuple[str, ...]]] = field(default_factory=dict, hash=False, compare=False)
    plugin: str = ""
    #: What to install for it: a model-opt extra, or the plugin's own distribution (filled in by the core).
    extra: str = ""
    #: Chosen when the user names the kind and this method but no backend (several backends may offer the
    #: method), or this backend but no method (the backend's usual technique).
    default: bool = False
    #: Architecture families it applies to (cnn, vit, hybrid, diffusion, transformer; see model-opt recommend);
    #: empty: any. The tuner never proposes a technique for a model outside its families.
    families: tuple[str, ...] = ()
    #: Where ``model-opt recommend`` (and the tuner's first trials) suggest it, and why.
    recommended: tuple[Recommended, ...] = field(default=(), hash=False, compare=False)
    #: What the autotuner may try: option name -> candidate values ({} = defaults only; None = never tuned).
    search_space: dict[str, tuple[Any, ...]] | None = field(default=None, hash=False, compare=False)
    #: What it needs to be fast, capability -> why (one of :data:`model_opt.device.CAPABILITIES`, e.g.
    #: ``{"int8 dot products": "int8 matmuls run slower than float without them"}``): on a device that lacks one,
    #: recommend marks it slow, autotune leaves it out, and the report says why.
    fast_needs: dict[str, str] = field(default_factory=dict, hash=False, compare=False)
    #: More of them for some families only, family -> {capability: why} (int8 matmul kernels for Linear-heavy
    #: transformers, where a CNN's int8 convolutions have kernels of their own).
    fast_needs_for: dict[str, dict[str, str]] = field(default_factory=dict, hash=False, compare=False)
    #: Export formats it writes, format -> the options it is applied with (``model-opt export --format gguf``
    #: applies the llama-cpp plugin's technique with ``type=f16`` and writes its result's own file).
    exports: dict[str, dict[str, Any]] = field(default_factory=dict, hash=False, compare=False)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"technique kind must be one of {', '.join(KINDS)}, not {self.kind!r}")
        unknown = sorted({*self.fast_needs, *(c for needs in self.fast_needs_for.values() for c in needs)}
                         - set(CAPABILITIES))
        if unknown:
            raise ValueError(f"{self.backend} {self.method}: fast_needs names {unknown[0]!r}; choose from "
                             f"{', '.join(CAPABILITIES)}")

    def slow_here(self, device: str = "cpu", family: str | None = None) -> str | None:
        """Why it is slow on ``device`` of this machine for a model of ``family`` (a capability of
        :attr:`fast_needs`, or of :attr:`fast_needs_for` the family, it lacks); else None."""
        return slow_here({**self.fast_needs, **self.fast_needs_for.get(family or "", {})}, device)

    @property
    def key(self) -> tuple[str, str, str]:
        return (self.kind, self.backend, self.method)

    @property
    def name(self) -> str:
        return f"{self.kind}:{self.backend}:{self.method}"

    @property
    def label(self) -> str:
        """How messages name the technique: ``backend method``."""
        return f"{self.backend} {self.method}"

    def option(self, name: str) -> Option:
        for opt in self.options:
            if opt.name == name:
                return opt
        for opt in self.options:
            if name in opt.aliases:
                import warnings

                warnings.warn(f"{self.backend} {self.method}: option {name!r} is now {opt.name!r}; the old name "
                              "is accepted for one more release", FutureWarning, stacklevel=3)
                return opt
        raise choose_one_of(f"option for {self.backend} {self.method}", name, (o.name for o in self.options))

    def speeds_up_on(self, options: Mapping[str, Any] | None = None) -> tuple[str, ...]:
        """Devices where it reduces latency in eager PyTorch (or its own runtime) with these options."""
        extra = [device for name, values in self.speeds_up_with.items()
                 for device in values.get((options or {}).get(name), ())]
        return tuple(dict.fromkeys([*self.speeds_up, *extra]))

    def fast_only_compiled(self, device: str, options: Mapping[str, Any] | None = None) -> bool:
        """True when it reduces latency on ``device`` (a kind: cpu, cuda) only under torch.compile."""
        return device in self.speeds_up_compiled and device not in self.speeds_up_on(options)

    def missing_packages(self) -> list[str]:
        """Required packages that are not importable (checked without importing them)."""
        missing = []
        for package in self.requires:
            try:
                found = importlib.util.find_spec(package) is not None
            except (ImportError, ValueError):
                found = False
            if not found:
                missing.append(package)
        return missing

    def validate_environment(self) -> None:
        """Raise BackendNotInstalled, naming the extra to install, when a package is missing."""
        missing = self.missing_packages()
        if missing:
            raise BackendNotInstalled(
                f"{self.backend} {self.method} needs the package {', '.join(missing)}, which is not installed",
                install_hint(self.extra or self.backend),
            )

    def resolve_options(self, given: Mapping[str, Any] | None) -> dict[str, Any]:
        """Defaults filled in; unknown names and bad values raise UsageError."""
        resolved = {opt.name: opt.default for opt in self.options}
        for name, value in (given or {}).items():
            opt = self.option(name)
            resolved[opt.name] = opt.coerce(value, where=f"{self.backend} {self.method} ")
        return resolved

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "backend": self.backend,
            "method": self.method,
            "summary": self.summary,
            "plugin": self.plugin,
            "options": [
                {"name": o.name, "type": o.type.__name__, "default": o.default, "help": o.help,
                 "choices": list(o.choices), "range": o.describe_range(), "flag": o.flag}
                for o in self.options
            ],
            "needs": list(self.needs),
            "requires": list(self.requires),
            "speeds_up": list(self.speeds_up),
            "speeds_up_compiled": list(self.speeds_up_compiled),
            "speed_note": self.speed_note,
            "speeds_up_with": {k: {str(v): list(d) for v, d in m.items()} for k, m in self.speeds_up_with.items()},
            "default": self.default,
            "families": list(self.families),
            "search_space": {k: list(v) for k, v in self.search_space.items()} if self.search_space is not None
            else None,
            "fast_needs": dict(self.fast_needs),
            "fast_needs_for": {family: dict(needs) for family, needs in self.fast_needs_for.items()},
        }


@dataclass
class Registry:
    """Every registered technique, keyed by (kind, backend, method)."""

    techniques: dict[tuple[str, str, str], Technique] = field(default_factory=dict)
    conflicts: dict[tuple[str, str, str], list[str]] = field(default_factory=dict)

    def add(self, technique: Technique) -> None:
        key = technique.key
        if key in self.conflicts:
            self.conflicts[key].append(technique.plugin)
        elif key in self.techniques and self.techniques[key].plugin != technique.plugin:
            self.conflicts[key] = [self.techniques.pop(key).plugin, technique.plugin]
        else:
            self.techniques[key] = technique

    def of_kind(self, kind: str) -> list[Technique]:
        return [t for t in self.techniques.values() if t.kind == kind]

    def find(self, kind: str, backend: str | None = None, method: str | None = None) -> Technique:
        """Resolve a technique; errors list what is installed and suggest the closest name."""
        if kind not in KINDS:
            raise choose_one_of("technique kind", kind, KINDS)
        for key, plugins in self.conflicts.items():
            if key[0] == kind and (backend in (None, key[1])) and (method in (None, key[2])):
                raise UsageError(
                    f"{key[1]} {key[2]} is registered by two plugins: {' and '.join(plugins)}",
                    "uninstall one of them (pip uninstall ...)",
                )
        candidates = self.of_kind(kind)
        if backend is not None:
            by_backend = [t for t in candidates if t.backend == backend]
            if not by_backend:
                offered = sorted(f"{t.kind}:{t.method}" for t in self.techniques.values() if t.backend == backend)
                if offered:
                    raise UsageError(f"backend {backend!r} offers no {kind} technique",
                                     f"it offers {', '.join(offered)}; for {kind}, choose one of: "
                                     f"{', '.join(sorted({t.backend for t in candidates})) or 'none installed'}")
                if backend in extras():
                    raise BackendNotInstalled(
                        f"the {kind} backend {backend!r} is not installed", install_hint(backend))
                raise choose_one_of(f"{kind} backend", backend, (t.backend for t in candidates))
            candidates = by_backend
        if method is not None:
            by_method = [t for t in candidates if t.method == method]
            if not by_method:
                where = f" of backend {backend!r}" if backend else ""
                error = choose_one_of(f"{kind} method{where}", method, (t.method for t in candidates))
                missing = sorted(plugin_extras() - {t.plugin for t in self.techniques.values()})
                if missing and backend is None:  # the method may come with a plugin that is not installed
                    error = UsageError(error.problem, f"{error.fix}; more methods come with plugins not installed "
                                       f"here ({', '.join(missing)}): pip install \"model-opt[all]\"")
                raise error
            candidates = by_method
        if not candidates:
            raise BackendNotInstalled(f"no installed plugin provides a {kind} technique",
                                      'pip install "model-opt[all]"')
        if len(candidates) > 1 and (method is not None or backend is not None):
            defaults = [t for t in candidates if t.default]
            if len(defaults) == 1:
                return defaults[0]
        if len(candidates) > 1:
            names = ", ".join(sorted(f"{t.backend}:{t.method}" for t in candidates))
            what = "backend" if method is not None else "method"
            raise UsageError(f"several {kind} techniques match", f"name the {what}; choose one of: {names}")
        return candidates[0]
