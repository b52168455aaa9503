"""``ils``: SlimFit's inter-layer scheduling. Freeze the lowest-scoring fraction each step.

With T schedulable units and freeze ratio r, the floor(r * T) units with the lowest scores are
frozen and the rest train. Frozen units keep stale scores; units never trained have huge random
scores, so every unit trains once, in a seeded random order, before any trains twice.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from slimfit_accel.hookspecs import ScheduleContext, hookimpl


@dataclass
class ILS:
    """Inter-layer scheduling (SlimFit). ``freeze_ratio`` in [0, 1): the share of units frozen."""

    freeze_ratio: float = 0.9

    def __post_init__(self) -> None:
        if not 0.0 <= self.freeze_ratio < 1.0:
            raise ValueError(f"freeze_ratio must be in [0, 1), got {self.freeze_ratio}")

    def select(self, ctx: ScheduleContext) -> list[str]:
        names = [unit.name for unit in ctx.units]
        n_frozen = math.floor(self.freeze_ratio * len(names) + 1e-9)
        # Ascending score; ties go to the unit defined first, so the choice is deterministic.
        lowest_first = sorted(range(len(names)), key=lambda i: (ctx.scores[names[i]], i))
        frozen = set(lowest_first[:n_frozen])
        return [name for i, name in enumerate(names) if i not in frozen]


@hookimpl
def register_schedulers(register):
    register("ils", ILS)
