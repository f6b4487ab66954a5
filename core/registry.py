"""Plugin discovery through the ``fedcore`` entry-point group, and component lookup.

There is no module-global manager: each :class:`PluginManager` is built on
demand, so tests and embedding applications get isolated registries.
"""

from __future__ import annotations

import difflib
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass
from importlib.metadata import EntryPoint, entry_points

import pluggy

from fedcore import hookspecs
from fedcore.components import KIND, KINDS, Component
from fedcore.errors import PluginError

ENTRY_POINT_GROUP = "fedcore"
DISABLE_ENV = "FEDCORE_DISABLE_PLUGINS"

#: kind name -> how messages call it (a view of :data:`fedcore.components.KINDS`)
KIND_LABELS = {kind.name: kind.label for kind in KINDS}


@dataclass(frozen=True)
class ComponentEntry:
    """A component class with where it came from."""

    kind: str
    name: str
    cls: type[Component]
    plugin: str
    distribution: str
    version: str

    @property
    def unavailable_reason(self) -> str | None:
        try:
            return self.cls.unavailable_reason()
        except Exception as exc:  # a broken availability probe must not break listing
            return f"availability check failed: {exc}"


@dataclass(frozen=True)
class PluginFailure:
    """A plugin module that could not be imported or registered."""

    plugin: str
    distribution: str
    version: str
    error: str

    def describe(self) -> str:
        return f"plugin '{self.plugin}' from {self.distribution} {self.version} failed to load: {self.error}"


def disabled_from_env() -> set[str]:
    """Names listed in ``FEDCORE_DISABLE_PLUGINS`` (plugin, distribution or component names, comma-separated)."""
    raw = os.environ.get(DISABLE_ENV, "")
    return {part.strip() for part in raw.split(",") if part.strip()}


def canonical(name: str) -> str:
    """A distribution name as pip compares them (PEP 503: case, ``-``, ``_`` and ``.`` alike)."""
    return re.sub(r"[-_.]+", "-", name).lower()


def _dist_of(ep: EntryPoint) -> tuple[str, str]:
    dist = getattr(ep, "dist", None)
    if dist is None:
        return "unknown distribution", "?"
    return dist.metadata["Name"] or "unknown distribution", dist.version or "?"


class PluginManager:
    """Discovers plugins and resolves component names.

    :param use_entry_points: load plugins registered under the ``fedcore`` entry-point group.
    :param extra_plugins: plugin objects (modules or instances) registered in addition, for
        tests and embedding; they count as distribution ``<local>``.
    :param disabled: plugin or component names to block; defaults to ``FEDCORE_DISABLE_PLUGINS``.
    """

    def __init__(
        self,
        use_entry_points: bool = True,
        extra_plugins: Iterable[object] = (),
        disabled: set[str] | None = None,
    ) -> None:
        self.disabled = disabled_from_env() if disabled is None else set(disabled)
        self._pm = pluggy.PluginManager(hookspecs.PROJECT)
        self._pm.add_hookspecs(hookspecs)
        self.failures: list[PluginFailure] = []
        self.blocked: list[str] = []
        #: plugins (entry points) not loaded because FEDCORE_DISABLE_PLUGINS names them or their distribution
        self.blocked_plugins: list[str] = []
        self._origin: dict[str, tuple[str, str]] = {}
        if use_entry_points:
            self._load_entry_points()
        for index, plugin in enumerate(extra_plugins):
            name = getattr(plugin, "__name__", None) or f"local-{index}"
            self._register(plugin, name, ("<local>", "-"))
        self.components: dict[str, dict[str, ComponentEntry]] = {kind.name: {} for kind in KINDS}
        self.conflicts: dict[tuple[str, str], list[ComponentEntry]] = {}
        self._collect()

    @property
    def hook(self) -> pluggy.HookRelay:
        return self._pm.hook

    def _load_entry_points(self) -> None:
        seen: set[str] = set()
        for ep in sorted(entry_points(group=ENTRY_POINT_GROUP), key=lambda e: (e.name, e.value)):
            dist = _dist_of(ep)
            if ep.name in self.disabled or canonical(dist[0]) in {canonical(d) for d in self.disabled}:
                self.blocked.append(ep.name)
                self.blocked_plugins.append(f"'{ep.name}' from {dist[0]} {dist[1]}")
                continue
            if ep.value in seen:
                continue
            seen.add(ep.value)
            try:
                plugin = ep.load()
            except Exception as exc:  # any import failure becomes a named, listed failure
                self.failures.append(PluginFailure(ep.name, *dist, f"{type(exc).__name__}: {exc}"))
                continue
            self._register(plugin, ep.name, dist)

    def _register(self, plugin: object, name: str, dist: tuple[str, str]) -> None:
        try:
            self._pm.register(plugin, name=name)
        except Exception as exc:
            self.failures.append(PluginFailure(name, *dist, f"{type(exc).__name__}: {exc}"))
            return
        self._origin[name] = dist
        self._check_pending(plugin, name, dist)

    def _check_pending(self, plugin: object, name: str, dist: tuple[str, str]) -> None:
        """Refuse a plugin implementing a hook fedcore does not have (a misspelled ``fedcore_aggregator``).

        pluggy's ``check_pending``, plugin by plugin: the plugin is unregistered and listed
        as a failure naming the hook, instead of silently contributing nothing.
        """
        try:
            self._pm.check_pending()
        except pluggy.PluginValidationError as exc:
            self._pm.unregister(plugin)
            del self._origin[name]
            unknown = sorted(
                hook for hook in dir(self._pm.hook) if not hook.startswith("_") and not getattr(self._pm.hook, hook).has_spec()
            )
            known = ", ".join(sorted(h for h in dir(self._pm.hook) if h.startswith("fedcore_") and h not in unknown))
            what = ", ".join(f"'{h}'" for h in unknown) or str(exc)
            self.failures.append(
                PluginFailure(name, *dist, f"implements {what}, which is not a fedcore hook (fedcore's hooks: {known})")
            )

    def _collect(self) -> None:
        for hook_name, kind in hookspecs.REGISTRATION_HOOKS.items():
            caller = getattr(self._pm.hook, hook_name)
            for impl in caller.get_hookimpls():
                plugin_name = self._pm.get_name(impl.plugin) or "?"
                dist = self._origin.get(plugin_name, ("<local>", "-"))
                try:
                    classes = impl.function() or []
                except Exception as exc:
                    self.failures.append(PluginFailure(plugin_name, *dist, f"{hook_name}: {type(exc).__name__}: {exc}"))
                    continue
                for cls in classes:
                    self._add(kind, cls, plugin_name, dist)

    def _add(self, kind: str, cls: type[Component], plugin: str, dist: tuple[str, str]) -> None:
        base = KIND[kind].base
        if not (isinstance(cls, type) and issubclass(cls, base)) or not cls.name:
            self.failures.append(
                PluginFailure(plugin, *dist, f"{cls!r} is not a named subclass of {base.__name__}")
            )
            return
        if cls.name in self.disabled:
            self.blocked.append(cls.name)
            return
        entry = ComponentEntry(kind, cls.name, cls, plugin, *dist)
        existing = self.components[kind].get(cls.name)
        if existing is not None and existing.cls is not cls:
            self.conflicts.setdefault((kind, cls.name), [existing]).append(entry)
            return
        self.components[kind][cls.name] = entry

    def register_observer(self, plugin: object, name: str) -> None:
        """Attach a spec's observer (:mod:`fedcore.observers`) for one run's lifecycle hooks."""
        self._pm.register(plugin, name=name)

    def unregister_observer(self, plugin: object) -> None:
        self._pm.unregister(plugin)

    def names(self, kind: str) -> list[str]:
        return sorted(self.components[kind])

    def entries(self) -> list[ComponentEntry]:
        return [e for kind in KINDS for e in sorted(self.components[kind.name].values(), key=lambda e: e.name)]

    def get(self, kind: str, name: str, where: str) -> type[Component]:
        """The component class for ``use: name`` at spec path ``where``; a one-line error otherwise."""
        label = KIND[kind].label
        if (kind, name) in self.conflicts:
            who = " and ".join(f"{e.distribution} {e.version} (plugin '{e.plugin}')" for e in self.conflicts[(kind, name)])
            raise PluginError(
                f"{label} '{name}' is provided by more than one plugin: {who}",
                where=where,
                hint=f"uninstall one, or block one with {DISABLE_ENV}=<plugin>",
            )
        entry = self.components[kind].get(name)
        if entry is None:
            choices = self.names(kind)
            close = difflib.get_close_matches(name, choices, n=1)
            hint = f"did you mean '{close[0]}'? " if close else ""
            hint += f"available {label}s: {', '.join(choices) or 'none'}"
            if name in self.blocked:
                hint = f"it is blocked by {DISABLE_ENV}"
            elif self.blocked_plugins and not close:
                raise PluginError(
                    f"{label} '{name}' is not available: {DISABLE_ENV} blocks the plugin(s) "
                    f"{', '.join(self.blocked_plugins)}, which may provide it",
                    where=where,
                    hint=f"remove the plugin or its distribution from {DISABLE_ENV}; available {label}s: {', '.join(choices) or 'none'}",
                )
            elif self.blocked_plugins:
                hint += f" (blocked by {DISABLE_ENV}: {', '.join(self.blocked_plugins)})"
            failed = "; ".join(f.describe() for f in self.failures)
            if failed:
                hint += f" (also: {failed})"
            raise PluginError(f"unknown {label} '{name}'", where=where, hint=hint)
        reason = entry.unavailable_reason
        if reason:
            raise PluginError(
                f"{label} '{name}' from {entry.distribution} {entry.version} is unavailable: {reason}", where=where
            )
        return entry.cls
