"""Compressor factories by name, from the ``register_compressors`` hook of installed plugins.

Used when the caller does not pass its own factories. Reads the entry-point group
``slimfit_accel`` directly, so the engine works on its own, without the rest of slimfit-accel's
plugin machinery; a plugin that cannot be imported is skipped with a warning naming it.
"""

from __future__ import annotations

import warnings
from importlib.metadata import entry_points
from typing import Any, Callable

from ..errors import PluginError
from ..hookspecs import PROJECT_NAME

Factory = Callable[..., Any]


def installed_compressor_factories() -> dict[str, Factory]:
    """``name -> factory`` for every compressor the installed ``slimfit_accel`` plugins register.

    Example::

        factories = installed_compressor_factories()
        int8 = factories["int8"](group_size=64)
    """
    factories: dict[str, Factory] = {}
    for entry in entry_points(group=PROJECT_NAME):
        try:
            module = entry.load()
        except Exception as exc:  # one broken plugin must not stop compression
            warnings.warn(f"plugin '{entry.name}' ({entry.value}) could not be loaded: {exc}", stacklevel=2)
            continue
        hook = getattr(module, "register_compressors", None)
        if hook is None:
            continue

        def register(name: str, factory: Factory, _plugin: str = entry.name) -> None:
            if name in factories and factories[name] is not factory:
                raise PluginError(_plugin, f"compressor '{name}' is already registered by another plugin")
            factories[name] = factory

        hook(register=register)
    return factories
