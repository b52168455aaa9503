"""Errors slimfit-accel raises on purpose: each says what is wrong, where, and what to do."""

from __future__ import annotations


class SlimFitError(Exception):
    """Base class for every error slimfit-accel raises on purpose."""


class ConfigError(SlimFitError, ValueError):
    """The SlimFit config (or its pairing with a model) is invalid. Raised before training."""


class PluginError(SlimFitError, RuntimeError):
    """A plugin raised, or answered something invalid. The message names the plugin."""

    def __init__(self, plugin: str, message: str):
        self.plugin, self.message = plugin, message
        super().__init__(f"plugin '{plugin}': {message}")

    def __reduce__(self):  # rebuilt from both arguments (the planner's worker processes send it back)
        return (type(self), (self.plugin, self.message))


class IntegrationError(SlimFitError, RuntimeError):
    """The training setup (Accelerate, DDP, DeepSpeed) cannot honour freezing as configured."""
