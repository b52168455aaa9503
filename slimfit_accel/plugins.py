"""Loading plugins and building the strategies a config names.

The built-ins in ``strategies/`` (``BUILTIN_PLUGINS``) are registered in code, always, whatever
the install's metadata says; third-party plugins come from the entry-point group
``slimfit_accel``. ``SLIMFIT_ACCEL_PLUGINS`` restricts which third-party plugins load: unset
loads every installed one; a comma-separated list loads the named ones; an empty value none.

Names are never silently shadowed: a third-party plugin named like a built-in or another plugin,
or registering a strategy name already taken, is a ``PluginError`` naming both plugins and the
distributions they come from. (The same entry point listed twice, as an editable install next to
a regular one can, loads once.)

Example::

    registry = StrategyRegistry.load()
    scheduler = registry.build("scheduler", StrategySpec(name="ils", freeze_ratio=0.9))
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import os
from dataclasses import dataclass
from importlib import metadata
from typing import Any, Callable, Iterable

import pluggy
from pydantic import TypeAdapter, ValidationError

from . import hookspecs
from .config import StrategySpec
from .errors import ConfigError, PluginError

ENTRY_POINT_GROUP = "slimfit_accel"
PLUGINS_ENV_VAR = "SLIMFIT_ACCEL_PLUGINS"
#: The built-in plugins, registered in code under their module's last name (``ils``, ``topk``).
BUILTIN_PLUGINS = (
    "slimfit_accel.strategies.scoring.weight_delta",
    "slimfit_accel.strategies.scoring.grad_norm",
    "slimfit_accel.strategies.scoring.random_score",
    "slimfit_accel.strategies.scheduling.ils",
    "slimfit_accel.strategies.scheduling.random_layers",
    "slimfit_accel.strategies.scheduling.progressive",
    "slimfit_accel.strategies.scheduling.static",
    "slimfit_accel.strategies.compression.none",
    "slimfit_accel.strategies.compression.int8",
    "slimfit_accel.strategies.compression.int4",
    "slimfit_accel.strategies.compression.fixed_point",
    "slimfit_accel.strategies.compression.topk",
    "slimfit_accel.strategies.compression.bitmask",
)
BUILTIN_SOURCE = "built into slimfit-accel"

#: strategy kind -> the registration hook that provides it
KIND_HOOKS = {
    "scorer": "register_scorers",
    "scheduler": "register_schedulers",
    "compressor": "register_compressors",
}
OBSERVER_HOOKS = ("slimfit_freeze_decision", "slimfit_step_end")


@dataclass(frozen=True)
class Registration:
    """One strategy a plugin registered."""

    kind: str
    name: str
    factory: Callable[..., Any]
    plugin: str


@dataclass(frozen=True)
class Built:
    """A strategy object built from a config section, and where it came from."""

    strategy: Any
    registration: Registration

    @property
    def label(self) -> str:
        return f"{self.registration.kind} '{self.registration.name}'"


class StrategyRegistry:
    """The loaded plugins and every strategy they registered, by kind and name."""

    def __init__(self, pm: pluggy.PluginManager, sources: dict[str, str] | None = None):
        self.pm = pm
        #: plugin name -> where it comes from (built in, a distribution, passed in code)
        self.sources = dict(sources or {})
        self.strategies: dict[str, dict[str, Registration]] = {kind: {} for kind in KIND_HOOKS}
        for kind, hook_name in KIND_HOOKS.items():
            for impl in getattr(pm.hook, hook_name).get_hookimpls():
                self._collect(kind, impl)

    @classmethod
    def load(cls, extra_plugins: Iterable[Any] = ()) -> "StrategyRegistry":
        """Load the built-ins, entry-point plugins (filtered by ``SLIMFIT_ACCEL_PLUGINS``) and ``extra_plugins``.

        ``extra_plugins`` are modules or objects with ``@hookimpl`` functions, registered
        directly: handy for a plugin that lives in your training script.
        """
        pm = pluggy.PluginManager(hookspecs.PROJECT_NAME)
        pm.add_hookspecs(hookspecs)
        sources: dict[str, str] = {}
        for module_name in BUILTIN_PLUGINS:
            _register(pm, importlib.import_module(module_name), _builtin_name(module_name), BUILTIN_SOURCE, sources)
        for entry_point in _selected_entry_points():
            source = f"distribution '{_distribution(entry_point)}', entry point {entry_point.value}"
            if pm.get_plugin(entry_point.name) is not None:  # before importing it: the clash is the error
                _clash(entry_point.name, source, sources)
            try:
                plugin = entry_point.load()
            except Exception as err:  # a broken plugin must be named, whatever it raised
                raise PluginError(
                    entry_point.name,
                    f"failed to import '{entry_point.value}': {type(err).__name__}: {err}",
                ) from err
            _register(pm, plugin, entry_point.name, source, sources)
        for plugin in extra_plugins:
            name = getattr(plugin, "__name__", None) or type(plugin).__name__
            _register(pm, plugin, name, "passed in code", sources)
        return cls(pm, sources)

    def _collect(self, kind: str, impl: pluggy.HookImpl) -> None:
        def register(name: str, factory: Callable[..., Any]) -> None:
            if not isinstance(name, str) or not name:
                raise PluginError(impl.plugin_name, f"registered a {kind} with invalid name {name!r}")
            if not callable(factory):
                raise PluginError(impl.plugin_name, f"registered {kind} '{name}' with a non-callable factory")
            known = self.strategies[kind].get(name)
            if known is not None:
                raise PluginError(
                    impl.plugin_name,
                    f"({self._source(impl.plugin_name)}) registers {kind} '{name}', already registered by "
                    f"plugin '{known.plugin}' ({self._source(known.plugin)}). Rename one of them, or leave "
                    f"the third-party one out with {PLUGINS_ENV_VAR}.",
                )
            self.strategies[kind][name] = Registration(kind, name, factory, impl.plugin_name)

        try:
            impl.function(register=register)
        except PluginError:
            raise
        except Exception as err:
            raise PluginError(impl.plugin_name, f"raised in {KIND_HOOKS[kind]}: {type(err).__name__}: {err}") from err

    def _source(self, plugin: str) -> str:
        return self.sources.get(plugin, "passed in code")

    def build(self, kind: str, spec: StrategySpec, where: str | None = None) -> Built:
        """Build the strategy ``spec`` names, validating its options; ``ConfigError`` if invalid."""
        where = where or kind
        known = self.strategies[kind]
        registration = known.get(spec.name)
        if registration is None:
            names = ", ".join(sorted(known)) or "none"
            raise ConfigError(
                f"{where}.name: unknown {kind} '{spec.name}'. Known {kind}s: {names}. "
                f"Install the plugin that provides it, or check {PLUGINS_ENV_VAR}."
            )
        options = spec.options
        try:
            strategy = _construct(registration.factory, options)
        except _OptionError as err:
            raise ConfigError(f"{where}: invalid options for {kind} '{spec.name}': {err}") from None
        except Exception as err:
            raise PluginError(
                registration.plugin, f"{kind} '{spec.name}' failed to build: {type(err).__name__}: {err}"
            ) from err
        protocol = {"scorer": hookspecs.Scorer, "scheduler": hookspecs.Scheduler, "compressor": hookspecs.Compressor}[kind]
        if not isinstance(strategy, protocol):
            raise PluginError(
                registration.plugin,
                f"{kind} '{spec.name}' built a {type(strategy).__name__}, which lacks the methods of "
                f"{protocol.__name__} (see slimfit_accel/hookspecs.py)",
            )
        return Built(strategy, registration)

    def observers(self, hook_name: str) -> list[pluggy.HookImpl]:
        """Implementations of an observer hook, called one by one so errors can name the plugin."""
        return list(getattr(self.pm.hook, hook_name).get_hookimpls())

    def describe(self) -> list[dict[str, Any]]:
        """Every loaded plugin with its strategies and hooks (for ``slimfit-accel plugins``)."""
        rows = []
        for name, plugin in sorted(self.pm.list_name_plugin(), key=lambda item: item[0]):
            hooks = sorted(caller.name for caller in self.pm.get_hookcallers(plugin) or [])
            strategies = {
                kind: sorted(r.name for r in regs.values() if r.plugin == name)
                for kind, regs in self.strategies.items()
            }
            module = getattr(plugin, "__name__", type(plugin).__name__)
            rows.append(
                {
                    "name": name,
                    "module": module,
                    "builtin": self.sources.get(name) == BUILTIN_SOURCE,
                    "strategies": {k: v for k, v in strategies.items() if v},
                    "hooks": hooks,
                }
            )
        return rows


def call_observers(registry: StrategyRegistry, hook_name: str, **kwargs: Any) -> None:
    """Call every implementation of an observer hook; a failure names its plugin."""
    for impl in registry.observers(hook_name):
        try:
            impl.function(**{arg: kwargs[arg] for arg in impl.argnames})
        except Exception as err:
            raise PluginError(impl.plugin_name, f"raised in {hook_name}: {type(err).__name__}: {err}") from err


class _OptionError(Exception):
    pass


def _construct(factory: Callable[..., Any], options: dict[str, Any]) -> Any:
    """Call ``factory(**options)``; for dataclass factories, type-check the options first."""
    if dataclasses.is_dataclass(factory) and isinstance(factory, type):
        fields = {f.name for f in dataclasses.fields(factory) if f.init}
        unknown = sorted(set(options) - fields)
        if unknown:
            raise _OptionError(f"unknown option(s) {unknown}; valid options: {sorted(fields) or 'none'}")
        try:
            return TypeAdapter(factory).validate_python(options)
        except ValidationError as err:
            problems = "; ".join(
                f"{'.'.join(str(p) for p in e['loc'])}: {_clean(e['msg'])} (got {e.get('input')!r})"
                if e["loc"]
                else _clean(e["msg"])  # raised by __post_init__: the message names the option
                for e in err.errors()
            )
            raise _OptionError(problems) from None
    try:
        inspect.signature(factory).bind(**options)
    except TypeError as err:
        raise _OptionError(str(err)) from None
    except ValueError:  # builtins without a signature: let the call itself decide
        pass
    return factory(**options)


def _clean(message: str) -> str:
    return message.removeprefix("Value error, ")


def _selected_entry_points() -> list[metadata.EntryPoint]:
    """The third-party entry points ``SLIMFIT_ACCEL_PLUGINS`` selects, each once.

    Entry points naming a built-in module are the built-ins as older installs of slimfit-accel
    listed them: they are registered in code already, so they are left out here.
    """
    entry_points = _unique(ep for ep in metadata.entry_points(group=ENTRY_POINT_GROUP) if ep.value not in BUILTIN_PLUGINS)
    wanted = os.environ.get(PLUGINS_ENV_VAR)
    if wanted is None:
        return entry_points
    names = {n.strip() for n in wanted.split(",") if n.strip()}
    installed = {ep.name for ep in entry_points}
    missing = sorted(names - installed)
    if missing:
        raise ConfigError(
            f"{PLUGINS_ENV_VAR} names {missing}, but no installed third-party plugin has "
            f"that name. Installed: {sorted(installed) or 'none'}."
        )
    return [ep for ep in entry_points if ep.name in names]


def _unique(entry_points: Iterable[metadata.EntryPoint]) -> list[metadata.EntryPoint]:
    """Each (name, module) once: an editable install next to a regular one can list an entry point
    twice. One name for two different modules is a clash: ``PluginError`` naming both."""
    seen: dict[str, metadata.EntryPoint] = {}
    for ep in entry_points:
        known = seen.setdefault(ep.name, ep)
        if known.value != ep.value:
            raise PluginError(
                ep.name,
                f"two installed entry points in group '{ENTRY_POINT_GROUP}' have this name: {known.value} "
                f"(distribution '{_distribution(known)}') and {ep.value} (distribution '{_distribution(ep)}'). "
                f"Uninstall or rename one of them.",
            )
    return list(seen.values())


def _distribution(entry_point: metadata.EntryPoint) -> str:
    dist = getattr(entry_point, "dist", None)
    return getattr(dist, "name", None) or "unknown"


def _builtin_name(module_name: str) -> str:
    return module_name.rsplit(".", 1)[-1]


def _clash(name: str, source: str, sources: dict[str, str]) -> None:
    raise PluginError(
        name,
        f"({source}) has the name of plugin '{name}' ({sources.get(name, 'passed in code')}) already loaded. "
        f"Rename one of them, or leave the third-party one out with {PLUGINS_ENV_VAR}.",
    )


def _register(pm: pluggy.PluginManager, plugin: Any, name: str, source: str, sources: dict[str, str]) -> None:
    if pm.is_registered(plugin):
        return  # the same object again (e.g. passed in code and installed): nothing new
    if pm.get_plugin(name) is not None:
        _clash(name, source, sources)
    try:
        pm.register(plugin, name=name)
    except pluggy.PluginValidationError as err:
        raise PluginError(name, f"does not match the hook contract: {err}") from err
    sources[name] = source
