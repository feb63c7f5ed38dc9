"""The one table of technique flags: kind -> its flags (the seed's spellings), and the kind-level option flags
that plugins declare (``Option(flag=...)``). The ``optimize`` command's options, ``model-opt techniques`` and
the commands ``recommend`` prints are all built from it; the core returns steps, never CLI text."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Annotated, Any

import typer
from model_opt.errors import UsageError


@dataclass(frozen=True)
class KindFlags:
    """The flags of one kind of technique."""

    kind: str
    enable: str
    backend: str
    method: tuple[str, ...]
    opt: str
    panel: str
    what: str
    method_help: str
    several: bool = False  # the method flag takes a comma list, one step each (fusion types)

    def param(self, flag: str) -> str:
        """The Python parameter name of one of this kind's flags."""
        return flag.lstrip("-").replace("-", "_")


#: In pipeline order (model_opt.hookspecs.KINDS); the spellings are the seed's.
KIND_FLAGS: dict[str, KindFlags] = {k.kind: k for k in (
    KindFlags("prune", "--prune", "--prune-backend", ("--prune-type", "--prune-method"), "--prune-opt", "Pruning",
              "Prune the model.", "The pruning method (default: unstructured)."),
    KindFlags("decompose", "--decompose", "--decompose-backend", ("--decompose-method",), "--decompose-opt",
              "Decomposition", "Low-rank decomposition.", "The decomposition method."),
    KindFlags("fuse", "--fuse", "--fuse-backend", ("--fuse-types",), "--fuse-opt", "Fusion", "Fuse layers.",
              "Comma list of the patterns to fuse (default: every one).", several=True),
    KindFlags("quantize", "--quantize", "--quant-backend", ("--quant-method",), "--quant-opt", "Quantization",
              "Quantize the model.", "The quantization method."),
)}

PYTHON_TYPES = {bool: bool, int: int, float: float, str: str, list: str}


@dataclass(frozen=True)
class OptionFlag:
    """A kind-level flag for an option that techniques of the kind declare (e.g. --prune-amount -> amount)."""

    kind: str
    flag: str
    option: str
    type: type
    help: str


def option_flags(techniques: Iterable[Any]) -> list[OptionFlag]:
    """Every kind-level option flag the installed techniques declare, with the techniques that take it."""
    found: dict[str, tuple[Any, Any, list[str]]] = {}
    for technique in sorted(techniques, key=lambda t: t.name):
        for option in technique.options:
            if option.flag:
                entry = found.setdefault(option.flag, (technique, option, []))
                entry[2].append(f"{technique.backend}:{technique.method}")
    return [OptionFlag(t.kind, flag, o.name, PYTHON_TYPES.get(o.type, str),
                       f"{o.help[:1].upper()}{o.help[1:]}." if len(users) == 1 else
                       f"The {o.name} option of {', '.join(users)} (see model-opt techniques).")
            for flag, (t, o, users) in found.items()]


def technique_parameters(registry: Any) -> list[inspect.Parameter]:
    """The optimize command's technique options, grouped by kind, as Typer parameters."""
    extra = option_flags(registry.techniques.values())
    params = []

    def add(name: str, kind_type: Any, *decls: str, help: str, panel: str, default: Any = None) -> None:
        option = typer.Option(*decls, help=help, rich_help_panel=panel, show_default=default is not None)
        params.append(inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default,
                                        annotation=Annotated[kind_type, option]))

    for kind in KIND_FLAGS.values():
        add(kind.param(kind.enable), bool, kind.enable, help=kind.what, panel=kind.panel, default=False)
        add(kind.param(kind.backend), str | None, kind.backend, panel=kind.panel,
            help=f"The {kind.kind} backend (default: the one that offers the method).")
        methods = sorted({t.method for t in registry.of_kind(kind.kind)})
        add(kind.param(kind.method[0]), str | None, *kind.method, panel=kind.panel,
            help=f"{kind.method_help} Installed: {', '.join(methods) or 'none'}.")
        for flag in (f for f in extra if f.kind == kind.kind):
            add(kind.param(flag.flag), flag.type | None, flag.flag, help=flag.help, panel=kind.panel)
        add(kind.param(kind.opt), list[str] | None, kind.opt, panel=kind.panel,
            help=f"Another option of the {kind.kind} technique, KEY=VALUE (see model-opt techniques); repeatable.")
    return params


def with_technique_flags(command: Callable[..., Any], registry: Any) -> Callable[..., Any]:
    """Give ``command`` (whose last parameter is ``**flags``) the technique flags of the installed plugins."""
    base = without_technique_flags(command)
    command.__signature__ = base.replace(parameters=[*base.parameters.values(),  # type: ignore[attr-defined]
                                                     *technique_parameters(registry)])
    return command


def without_technique_flags(command: Callable[..., Any]) -> inspect.Signature:
    """Set (once) and return the command's own signature without ``**flags``, until
    :func:`with_technique_flags` adds the flags."""
    base = getattr(command, "_base_signature", None)
    if base is None:
        signature = inspect.signature(command, eval_str=True)
        base = signature.replace(parameters=[p for p in signature.parameters.values()
                                             if p.kind != inspect.Parameter.VAR_KEYWORD])
        command._base_signature = base  # type: ignore[attr-defined]
        command.__signature__ = base  # type: ignore[attr-defined]
    return base


def parse_pairs(pairs: list[str] | None, flag: str) -> dict[str, str]:
    options = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise UsageError(f"{flag} {pair!r} is not KEY=VALUE", f"write it like {flag} amount=0.3")
        options[key.strip()] = value.strip()
    return options


def build_steps(flags: dict[str, Any], registry: Any) -> list[Any]:
    """The steps the technique flags ask for, in pipeline order; a flag of a kind not enabled is an error."""
    from model_opt.steps import Step

    extra = option_flags(registry.techniques.values())
    steps = []
    for kind in KIND_FLAGS.values():
        names = [kind.backend, kind.method[0], *(f.flag for f in extra if f.kind == kind.kind), kind.opt]
        stray = [flag for flag in names if flags.get(kind.param(flag)) not in (None, [])]
        if not flags.get(kind.param(kind.enable)):
            if stray:
                raise UsageError(f"{stray[0]} is set, but {kind.enable} is not, so it would do nothing",
                                 f"add {kind.enable}, or drop {stray[0]}")
            continue
        options: dict[str, Any] = parse_pairs(flags.get(kind.param(kind.opt)), kind.opt)
        for flag in (f for f in extra if f.kind == kind.kind):
            if flags.get(kind.param(flag.flag)) is not None:
                options[flag.option] = flags[kind.param(flag.flag)]
        backend, method = flags.get(kind.param(kind.backend)), flags.get(kind.param(kind.method[0]))
        if kind.kind == "prune" and method is None:
            method = default_prune_method(backend, registry)
        methods = [m.strip() for m in (method or "").split(",") if m.strip()] if kind.several else [method]
        if kind.several and not methods:  # every installed one (of the backend, when named)
            methods = sorted({t.method for t in registry.of_kind(kind.kind) if backend in (None, t.backend)})
        steps.extend(Step(kind.kind, backend, m, dict(options)) for m in methods or [None])
    return steps


def default_prune_method(backend: str | None, registry: Any) -> str | None:
    """The seed's default pruning is unstructured; a backend without that method keeps its only one."""
    if backend is None:
        return "unstructured"
    return "unstructured" if ("prune", backend, "unstructured") in registry.techniques else None


def command_flags(technique: Any, options: dict[str, Any]) -> str:
    """The flags that ask for ``technique`` with ``options`` (kind-level flags where the option has one)."""
    flags = KIND_FLAGS[technique.kind]
    declared = {o.name: o.flag for o in technique.options if o.flag}
    parts = [flags.enable, f"{flags.backend} {technique.backend}", f"{flags.method[0]} {technique.method}"]
    for name, value in options.items():
        text = ",".join(map(str, value)) if isinstance(value, list) else str(value)
        parts.append(f"{declared[name]} {text}" if name in declared else f"{flags.opt} {name}={text}")
    return " ".join(parts)


def option_usage(kind: str, option: Any) -> str:
    """How an option is given on the command line: its kind-level flag, else --<kind>-opt name=..."""
    value = f"<{option.type.__name__}>"
    return f"{option.flag} {value}" if option.flag else f"{KIND_FLAGS[kind].opt} {option.name}={value}"
