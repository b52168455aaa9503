"""Compressor factories by name, from the plugins' ``register_compressors`` hooks."""

from __future__ import annotations

from typing import Any, Callable

Factory = Callable[..., Any]


def installed_compressor_factories() -> dict[str, Factory]:
    """``name -> factory`` for every compressor the loaded ``slimfit_accel`` plugins register.

    Example::

        factories = installed_compressor_factories()
        int8 = factories["int8"](group_size=64)
    """
    from ..plugins import StrategyRegistry

    registry = StrategyRegistry.load()
    return {name: reg.factory for name, reg in registry.strategies["compressor"].items()}
