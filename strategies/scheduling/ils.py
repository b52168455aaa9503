"""``ils``: SlimFit's inter-layer scheduling. Freeze the lowest-priority fraction each step.

With T schedulable units and freeze ratio r, the floor(r * T) units with the lowest priority are
frozen and the rest train. A unit's priority is its score (stale for frozen units) times its age,
the steps since it last trained, raised to ``age_exponent``:

* ``age_exponent: 0`` (SlimFit's reference): priority = score. Units whose score stays high
  train at nearly every step; the others wait until every higher score has gone stale below theirs.
* ``age_exponent: 1``: a unit waits about (threshold / score) steps, so it trains at a rate
  proportional to its score and no unit is starved.

Units never trained have huge random scores, so every unit trains once, in a seeded random
order, before any trains twice.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from slimfit_accel.hookspecs import ScheduleContext, hookimpl


@dataclass
class ILS:
    """Inter-layer scheduling (SlimFit). ``freeze_ratio`` in [0, 1): the share of units frozen;
    ``age_exponent`` >= 0: how strongly waiting raises a unit's priority (0: the reference)."""

    freeze_ratio: float = 0.9
    age_exponent: float = 0.0

    def __post_init__(self) -> None:
        if not 0.0 <= self.freeze_ratio < 1.0:
            raise ValueError(f"freeze_ratio must be in [0, 1), got {self.freeze_ratio}")
        if not 0.0 <= self.age_exponent <= 8.0:
            raise ValueError(f"age_exponent must be in [0, 8], got {self.age_exponent}")

    def select(self, ctx: ScheduleContext) -> list[str]:
        names = [unit.name for unit in ctx.units]
        n_frozen = math.floor(self.freeze_ratio * len(names) + 1e-9)
        priority = [self._priority(ctx, name) for name in names]
        # Ascending priority; ties go to the unit defined first, so the choice is deterministic.
        lowest_first = sorted(range(len(names)), key=lambda i: (priority[i], i))
        frozen = set(lowest_first[:n_frozen])
        return [name for i, name in enumerate(names) if i not in frozen]

    def _priority(self, ctx: ScheduleContext, name: str) -> float:
        score = ctx.scores[name]
        if self.age_exponent == 0.0:
            return score
        age = ctx.step - ctx.last_trained.get(name, -1)
        return score * float(age) ** self.age_exponent


@hookimpl
def register_schedulers(register):
    register("ils", ILS)
