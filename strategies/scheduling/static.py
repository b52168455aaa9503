"""``static``: train the units matching fixed patterns, freeze the rest, at every step.

The smallest complete scheduler: copy this file to start your own plugin.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from fnmatch import fnmatchcase

from slimfit_accel.hookspecs import ScheduleContext, hookimpl


@dataclass
class Static:
    """Train units whose name matches one of the ``train`` glob patterns."""

    train: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.train:
            raise ValueError("give at least one pattern in 'train' (e.g. ['*.layer.11.*'])")

    def select(self, ctx: ScheduleContext) -> list[str]:
        for pattern in self.train:
            if not any(fnmatchcase(u.name, pattern) for u in ctx.units):
                raise ValueError(f"pattern {pattern!r} matches no unit (units look like {ctx.units[0].name!r})")
        return [u.name for u in ctx.units if any(fnmatchcase(u.name, p) for p in self.train)]


@hookimpl
def register_schedulers(register):
    register("static", Static)
