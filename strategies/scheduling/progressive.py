"""``progressive``: freeze the model front to back as training goes (FreezeOut / AutoFreeze).

Units are grouped into stages by depth: the units before the first block, then each block, then
the units after the last block. Stage j of n freezes for good once the training progress
(step / total_steps) reaches ``start + (end - start) * j / (n - 2)``; the last stage (usually
the head) never freezes. Needs the planned number of steps: ``attach(..., total_steps=N)``
or the ``total_steps`` option.
"""

from __future__ import annotations

from dataclasses import dataclass

from slimfit_accel.hookspecs import ScheduleContext, UnitInfo, hookimpl


@dataclass
class Progressive:
    """Front-to-back freezing between ``start`` and ``end`` (fractions of training)."""

    start: float = 0.5
    end: float = 0.9
    total_steps: int | None = None

    def __post_init__(self) -> None:
        if not 0.0 <= self.start <= self.end <= 1.0:
            raise ValueError(f"need 0 <= start <= end <= 1, got start={self.start}, end={self.end}")
        if self.total_steps is not None and self.total_steps < 1:
            raise ValueError(f"total_steps must be positive, got {self.total_steps}")

    def select(self, ctx: ScheduleContext) -> list[str]:
        total = self.total_steps or ctx.total_steps
        if not total:
            raise ValueError("progressive needs total_steps: pass attach(..., total_steps=N) or set scheduler.total_steps")
        stages = _stages(ctx.units)
        progress = ctx.step / total
        frozen_stages = 0
        for j in range(len(stages) - 1):
            threshold = self.start + (self.end - self.start) * (j / max(len(stages) - 2, 1))
            if progress >= threshold:
                frozen_stages = j + 1
        return [u.name for stage in stages[frozen_stages:] for u in stage]


def _stages(units: tuple[UnitInfo, ...]) -> list[list[UnitInfo]]:
    blocks = sorted({u.block for u in units if u.block is not None})
    first_block_index = min((u.index for u in units if u.block is not None), default=None)
    before = [u for u in units if u.block is None and (first_block_index is None or u.index < first_block_index)]
    after = [u for u in units if u.block is None and u not in before]
    stages = [before] + [[u for u in units if u.block == b] for b in blocks] + [after]
    return [stage for stage in stages if stage]


@hookimpl
def register_schedulers(register):
    register("progressive", Progressive)
