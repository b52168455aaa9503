"""slimfit-accel: SlimFit (freeze most weights each step, chosen from training dynamics) for Accelerate.

Start with ``SlimFit`` (``slimfit_accel/slimfit.py``); the plugin contract is
``slimfit_accel/hookspecs.py``; built-in strategies live in ``strategies/``.
"""

from .config import SlimFitConfig, StrategySpec, UnitsConfig, load_config
from .errors import ConfigError, IntegrationError, PluginError, SlimFitError
from .hookspecs import ScheduleContext, SavedTensorContext, UnitInfo, UnitView, hookimpl
from .report import SlimFitReport
from .slimfit import SlimFit, make_accelerator
from .units import ParameterSummary

__version__ = "0.1.0"

__all__ = [
    "SlimFit",
    "make_accelerator",
    "ParameterSummary",
    "SlimFitConfig",
    "SlimFitReport",
    "StrategySpec",
    "UnitsConfig",
    "load_config",
    "hookimpl",
    "ScheduleContext",
    "SavedTensorContext",
    "UnitInfo",
    "UnitView",
    "SlimFitError",
    "ConfigError",
    "PluginError",
    "IntegrationError",
]


def __getattr__(name: str):
    # The Trainer callback needs transformers: imported only when asked for.
    if name == "SlimFitCallback":
        from .integrations.trainer import SlimFitCallback

        return SlimFitCallback
    raise AttributeError(f"module 'slimfit_accel' has no attribute {name!r}")
