"""Discover plugins through entry points, each loaded on its own, and dispatch technique calls."""

from __future__ import annotations

import contextlib
import importlib
import sys
from dataclasses import dataclass, field, replace
from importlib.metadata import PackageNotFoundError, entry_points, version
from typing import Any

import pluggy

from . import hookspecs
from .errors import ModelLoadError, ModelOptError, TechniqueError, describe, first_line
from .registry import Registry, Technique, extras, install_hint
from .result import TechniqueResult
from .telemetry import backend_telemetry_off

#: Plugins that ship inside the core, registered through the same hooks as any other.
DEFAULT_PLUGINS: dict[str, str] = {
    "basic": "model_opt.builtin.basic_pruning",
}


@dataclass
class PluginRecord:
    """What ``model-opt plugins`` shows for one plugin."""

    name: str
    module: str
    distribution: str | None = None
    version: str | None = None
    status: str = "ok"  # ok | unavailable | broken | conflict
    reason: str = ""
    hint: str = ""
    techniques: list[Technique] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "module": self.module,
            "distribution": self.distribution,
            "version": self.version,
            "status": self.status,
            "reason": self.reason,
            "hint": self.hint,
            "techniques": [t.name for t in self.techniques],
        }


class PluginManager:
    """The pluggy manager plus the technique registry built from every plugin's registrations."""

    def __init__(self, load_entry_points: bool = True) -> None:
        self.pm = pluggy.PluginManager(hookspecs.PROJECT)
        self.pm.add_hookspecs(hookspecs)
        self.records: dict[str, PluginRecord] = {}
        self.registry = Registry()
        for name, module_name in DEFAULT_PLUGINS.items():
            module = importlib.import_module(module_name)
            self._add(name, module, PluginRecord(name=name, module=module_name, distribution="model-opt",
                                                 version=_version("model-opt")))
        if load_entry_points:
            self._load_entry_points()
        self._flag_conflicts()

    def _flag_conflicts(self) -> None:
        """A backend+method registered by two plugins is unusable: say so on both plugins' records."""
        for key, owners in self.registry.conflicts.items():
            for owner in owners:
                record = self.records.get(owner)
                if record is None:
                    continue
                others = " and ".join(o for o in owners if o != owner)
                record.status = "conflict"
                reason = f"{key[0]}:{key[1]}:{key[2]} is also registered by {others}"
                record.reason = f"{record.reason}; {reason}" if record.reason else reason
                record.hint = "uninstall one of the two plugins (pip uninstall ...)"

    # -- loading -----------------------------------------------------------------------------
    def _load_entry_points(self) -> None:
        for ep in sorted(entry_points(group=hookspecs.PROJECT), key=lambda e: e.name):
            dist = getattr(ep, "dist", None)
            record = PluginRecord(
                name=ep.name,
                module=ep.value,
                distribution=dist.metadata["Name"] if dist else None,
                version=dist.version if dist else None,
            )
            if ep.name in self.records:
                record.status, record.reason = "broken", f"the plugin name {ep.name!r} is already taken"
                self.records[f"{ep.name} ({ep.value})"] = record
                continue
            try:
                with contextlib.redirect_stdout(sys.stderr):  # a print() at import must not reach --json output
                    plugin = ep.load()
            except KeyboardInterrupt:
                raise
            except BaseException as exc:  # each entry point on its own (sys.exit() included): it breaks nothing else
                record.status = "broken"
                record.reason = f"import failed: {describe(exc)}"
                record.hint = install_hint(ep.name) if ep.name in extras() else ""
                self.records[ep.name] = record
                continue
            self._add(ep.name, plugin, record)

    def register(self, plugin: Any, name: str) -> PluginRecord:
        """Register a plugin object in-process (for tests and embedding applications)."""
        record = PluginRecord(name=name, module=getattr(plugin, "__name__", type(plugin).__name__))
        self._add(name, plugin, record)
        self._flag_conflicts()
        return record

    def _add(self, name: str, plugin: Any, record: PluginRecord) -> None:
        self.records[name] = record
        try:
            self.pm.register(plugin, name=name)
        except Exception as exc:
            record.status, record.reason = "broken", f"registration failed: {first_line(exc)}"
            return
        impls = [i for i in self.pm.hook.register_techniques.get_hookimpls() if i.plugin_name == name]
        found: list[Technique] = []

        def register(technique: Technique) -> None:
            if not isinstance(technique, Technique):
                raise TypeError("register() takes a model_opt.registry.Technique")
            extra = technique.extra or (name if name in extras() else record.distribution or name)
            found.append(_replace(technique, plugin=name, extra=extra))

        try:
            with contextlib.redirect_stdout(sys.stderr):
                for impl in impls:
                    impl.function(register=register)
        except KeyboardInterrupt:
            raise
        except BaseException as exc:
            record.status = "broken"
            record.reason = f"register_techniques failed: {describe(exc)}"
            self.pm.unregister(name=name)
            return
        record.techniques = found
        for technique in found:
            self.registry.add(technique)
        missing = sorted({pkg for t in found for pkg in t.missing_packages()})
        if missing:
            record.status = "unavailable"
            record.reason = f"missing package: {', '.join(missing)}"
            record.hint = install_hint(found[0].extra)

    # -- dispatch ----------------------------------------------------------------------------
    def apply(self, technique: Technique, model: Any, options: dict[str, Any], context: Any) -> TechniqueResult:
        """Call the technique's hook on its own plugin only (its environment validated by :func:`model_opt.steps.plan`);
        wrappers of every plugin wrap the call."""
        value = self._call_owner(technique.kind, technique, model=model, technique=technique, options=options,
                                 context=context)
        if value is None:
            raise TechniqueError(
                f"plugin {technique.plugin!r} registered {technique.name} but its {technique.kind} hook "
                "returned nothing",
                "report this to the plugin's authors",
            )
        result = TechniqueResult.coerce(value)
        if result is None:
            raise TechniqueError(
                f"plugin {technique.plugin!r} returned {type(value).__name__} from {technique.kind}",
                "a technique hook must return a TechniqueResult or (model, info)",
            )
        return result

    def can_restore(self, technique: Technique) -> bool:
        """True when the technique's own plugin implements the ``restore`` hook."""
        return any(impl.plugin_name == technique.plugin and not (impl.wrapper or impl.hookwrapper)
                   for impl in self.pm.hook.restore.get_hookimpls())

    def restore(self, technique: Technique, model: Any, options: dict[str, Any], state: dict[str, Any],
                context: Any) -> Any:
        """Replay one recorded step through the ``restore`` hook of the technique's own plugin."""
        technique.validate_environment()
        restored = self._call_owner("restore", technique, model=model, technique=technique, options=options,
                                    state=state, context=context)
        if restored is None:
            raise TechniqueError(f"plugin {technique.plugin!r} could not restore {technique.name} "
                                 "(its restore hook returned nothing)", "report this to the plugin's authors")
        return restored

    def _call_owner(self, hook_name: str, owner: Technique, /, **kwargs: Any) -> Any:
        """Run ``hook_name`` with the owner plugin's implementation and every plugin's wrappers only.

        pluggy's subset callers drop whole plugins; a plugin that both wraps a hook (to observe) and
        implements it (for its own technique) must keep its wrapper without its implementation.
        """
        backend_telemetry_off()  # before a backend runs: model-opt sends nothing on the user's behalf
        hook = getattr(self.pm.hook, hook_name)
        impls = [impl for impl in hook.get_hookimpls()
                 if impl.wrapper or impl.hookwrapper or impl.plugin_name == owner.plugin]
        try:
            return self.pm._hookexec(hook.name, impls, kwargs, True)
        except BaseException as exc:
            culprit = _failing_wrapper(exc, impls)
            if culprit is None or isinstance(exc, (KeyboardInterrupt, ModelOptError)):
                raise
            raise TechniqueError(
                f"plugin {culprit!r}, which wraps the {hook_name} hook, failed around {owner.name} "
                f"({type(exc).__name__}: {first_line(exc)})",
                f"fix or uninstall {culprit!r}; {owner.name} itself did not fail",
            ) from None

    def open_model(self, path: Any) -> Any:
        """Ask each plugin's ``load_model`` hook for ``path``; the first model returned wins. A hook that
        raises is a one-line error naming its plugin."""
        backend_telemetry_off()
        for impl in reversed(self.pm.hook.load_model.get_hookimpls()):
            try:
                model = impl.function(path=path)
            except KeyboardInterrupt:
                raise
            except ModelOptError:
                raise
            except BaseException as exc:
                raise ModelLoadError(f"plugin {impl.plugin_name!r} could not open {path.name} "
                                     f"({type(exc).__name__}: {first_line(exc)})",
                                     "check that the file is complete, or ask the plugin's authors") from None
            if model is not None:
                return model
        return None

    def register_commands(self, app: Any) -> None:
        for impl in self.pm.hook.register_commands.get_hookimpls():
            record = self.records.get(impl.plugin_name)
            try:
                impl.function(app=app)
            except KeyboardInterrupt:
                raise
            except BaseException as exc:
                if record:
                    record.status = "broken"
                    record.reason = f"register_commands failed: {first_line(exc)}"


def _replace(technique: Technique, **changes: Any) -> Technique:
    return replace(technique, **changes)


def _failing_wrapper(exc: BaseException, impls: list[Any]) -> str | None:
    """The plugin whose wrapper raised ``exc``: the innermost hook implementation in the traceback is a
    wrapper (an exception from the owner's implementation has the owner's frame deeper down)."""
    codes = {getattr(impl.function, "__code__", None): impl for impl in impls}
    innermost = None
    tb = exc.__traceback__
    while tb is not None:
        impl = codes.get(tb.tb_frame.f_code)
        if impl is not None:
            innermost = impl
        tb = tb.tb_next
    if innermost is None or not (innermost.wrapper or innermost.hookwrapper):
        return None
    return innermost.plugin_name



def _version(dist: str) -> str | None:
    try:
        return version(dist)
    except PackageNotFoundError:
        return None


_MANAGER: PluginManager | None = None


def get_plugin_manager() -> PluginManager:
    """The process-wide manager, built on first use."""
    global _MANAGER
    if _MANAGER is None:
        _MANAGER = PluginManager()
    return _MANAGER


def reset_plugin_manager() -> None:
    """Forget the process-wide manager (after installing or uninstalling plugins)."""
    global _MANAGER
    _MANAGER = None
    importlib.invalidate_caches()
