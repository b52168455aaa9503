"""Loading plugins and building the strategies a config names.

Plugins come from the entry-point group ``slimfit_accel``; the built-ins in ``strategies/`` are
registered there too, so they load exactly like third-party ones. ``SLIMFIT_ACCEL_PLUGINS``
restricts what loads: unset loads everything installed; a comma-separated list loads the
built-ins plus the named plugins; an empty value loads the built-ins only.

Example::

    registry = StrategyRegistry.load()
    scheduler = registry.build("scheduler", StrategySpec(name="ils", freeze_ratio=0.9))
"""

from __future__ import annotations

import dataclasses
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
BUILTIN_MODULE_PREFIX = "slimfit_accel."

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

    def __init__(self, pm: pluggy.PluginManager):
        self.pm = pm
        self.strategies: dict[str, dict[str, Registration]] = {kind: {} for kind in KIND_HOOKS}
        for kind, hook_name in KIND_HOOKS.items():
            for impl in getattr(pm.hook, hook_name).get_hookimpls():
                self._collect(kind, impl)

    @classmethod
    def load(cls, extra_plugins: Iterable[Any] = ()) -> "StrategyRegistry":
        """Load entry-point plugins (filtered by ``SLIMFIT_ACCEL_PLUGINS``) plus ``extra_plugins``.

        ``extra_plugins`` are modules or objects with ``@hookimpl`` functions, registered
        directly: handy for a plugin that lives in your training script.
        """
        pm = pluggy.PluginManager(hookspecs.PROJECT_NAME)
        pm.add_hookspecs(hookspecs)
        for entry_point in _selected_entry_points():
            try:
                plugin = entry_point.load()
            except Exception as err:  # a broken plugin must be named, whatever it raised
                raise PluginError(
                    entry_point.name,
                    f"failed to import '{entry_point.value}': {type(err).__name__}: {err}",
                ) from err
            _register(pm, plugin, entry_point.name)
        for plugin in extra_plugins:
            _register(pm, plugin, getattr(plugin, "__name__", None) or type(plugin).__name__)
        return cls(pm)

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
                    f"registers {kind} '{name}', already registered by plugin '{known.plugin}'. "
                    f"Disable one of them with {PLUGINS_ENV_VAR}.",
                )
            self.strategies[kind][name] = Registration(kind, name, factory, impl.plugin_name)

        try:
            impl.function(register=register)
        except PluginError:
            raise
        except Exception as err:
            raise PluginError(impl.plugin_name, f"raised in {KIND_HOOKS[kind]}: {type(err).__name__}: {err}") from err

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
                    "builtin": module.startswith(BUILTIN_MODULE_PREFIX),
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
    entry_points = list(metadata.entry_points(group=ENTRY_POINT_GROUP))
    wanted = os.environ.get(PLUGINS_ENV_VAR)
    if wanted is None:
        return _unique(entry_points)
    names = {n.strip() for n in wanted.split(",") if n.strip()}
    third_party = {ep.name for ep in entry_points if not ep.value.startswith(BUILTIN_MODULE_PREFIX)}
    missing = sorted(names - third_party)
    if missing:
        raise ConfigError(
            f"{PLUGINS_ENV_VAR} names {missing}, but no installed third-party plugin has "
            f"that name. Installed: {sorted(third_party) or 'none'}."
        )
    return _unique(ep for ep in entry_points if ep.value.startswith(BUILTIN_MODULE_PREFIX) or ep.name in names)


def _unique(entry_points: Iterable[metadata.EntryPoint]) -> list[metadata.EntryPoint]:
    # An editable install next to a regular one can list the same entry point twice.
    seen: dict[str, metadata.EntryPoint] = {}
    for ep in entry_points:
        seen.setdefault(ep.name, ep)
    return list(seen.values())


def _register(pm: pluggy.PluginManager, plugin: Any, name: str) -> None:
    if pm.get_plugin(name) is not None or pm.is_registered(plugin):
        return
    try:
        pm.register(plugin, name=name)
    except pluggy.PluginValidationError as err:
        raise PluginError(name, f"does not match the hook contract: {err}") from err
