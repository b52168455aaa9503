"""slimfit-accel: SlimFit (freeze most weights each step, chosen from training dynamics) for Accelerate.

Start with ``SlimFit`` (``slimfit_accel/slimfit.py``); the plugin contract is
``slimfit_accel/hookspecs.py``; built-in strategies live in ``strategies/``.
"""

from .config import SlimFitConfig, StrategySpec, UnitsConfig, load_config
from .errors import ConfigError, IntegrationError, PluginError, SlimFitError
from .hookspecs import ScheduleContext, SavedTensorContext, UnitInfo, UnitView, hookimpl
from .report import SlimFitReport
from .slimfit import SlimFit

__version__ = "0.1.0"

__all__ = [
    "SlimFit",
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
