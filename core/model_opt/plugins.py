"""Discover plugins through entry points, each loaded on its own, and dispatch technique calls."""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from typing import Any

import pluggy

from . import hookspecs
from .errors import TechniqueError
from .registry import KNOWN_BACKENDS, Registry, Technique, install_hint

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
    status: str = "ok"  # ok | unavailable | broken
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
                plugin = ep.load()
            except Exception as exc:  # each entry point on its own: one broken plugin breaks nothing else
                record.status = "broken"
                record.reason = f"import failed: {type(exc).__name__}: {exc}".splitlines()[0]
                record.hint = _hint_for(ep.name)
                self.records[ep.name] = record
                continue
            self._add(ep.name, plugin, record)

    def register(self, plugin: Any, name: str) -> PluginRecord:
        """Register a plugin object in-process (for tests and embedding applications)."""
        record = PluginRecord(name=name, module=getattr(plugin, "__name__", type(plugin).__name__))
        self._add(name, plugin, record)
        return record

    def _add(self, name: str, plugin: Any, record: PluginRecord) -> None:
        self.records[name] = record
        try:
            self.pm.register(plugin, name=name)
        except Exception as exc:
            record.status, record.reason = "broken", f"registration failed: {exc}".splitlines()[0]
            return
        impls = [i for i in self.pm.hook.register_techniques.get_hookimpls() if i.plugin_name == name]
        found: list[Technique] = []

        def register(technique: Technique) -> None:
            if not isinstance(technique, Technique):
                raise TypeError("register() takes a model_opt.registry.Technique")
            extra = technique.extra or (name if name in KNOWN_BACKENDS else technique.backend)
            found.append(_replace(technique, plugin=name, extra=extra))

        try:
            for impl in impls:
                impl.function(register=register)
        except Exception as exc:
            record.status = "broken"
            record.reason = f"register_techniques failed: {type(exc).__name__}: {exc}".splitlines()[0]
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
    def apply(self, technique: Technique, model: Any, options: dict[str, Any], context: Any) -> tuple[Any, dict]:
        """Call the technique's hook on its own plugin only; wrappers of every plugin wrap the call."""
        technique.validate_environment()
        hook = getattr(self.pm.hook, technique.kind)
        keep = {technique.plugin}
        keep |= {impl.plugin_name for impl in hook.get_hookimpls() if impl.hookwrapper or impl.wrapper}
        remove = [p for n, p in self.pm.list_name_plugin() if n not in keep]
        caller = self.pm.subset_hook_caller(technique.kind, remove_plugins=remove)
        result = caller(model=model, technique=technique, options=options, context=context)
        if result is None:
            raise TechniqueError(
                f"plugin {technique.plugin!r} registered {technique.name} but its {technique.kind} hook "
                "returned nothing",
                "report this to the plugin's authors",
            )
        if not (isinstance(result, tuple) and len(result) == 2):
            raise TechniqueError(
                f"plugin {technique.plugin!r} returned {type(result).__name__} from {technique.kind}",
                "a technique hook must return (model, info)",
            )
        new_model, info = result
        return new_model, dict(info or {})

    def register_commands(self, app: Any) -> None:
        for impl in self.pm.hook.register_commands.get_hookimpls():
            record = self.records.get(impl.plugin_name)
            try:
                impl.function(app=app)
            except Exception as exc:
                if record:
                    record.status = "broken"
                    record.reason = f"register_commands failed: {exc}".splitlines()[0]


def _replace(technique: Technique, **changes: Any) -> Technique:
    from dataclasses import replace

    return replace(technique, **changes)


def _version(dist: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return None


def _hint_for(name: str) -> str:
    return install_hint(name) if name in KNOWN_BACKENDS else ""


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
