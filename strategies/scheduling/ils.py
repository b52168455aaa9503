"""``ils``: SlimFit's inter-layer scheduling. Freeze the lowest-priority fraction each step.

With T schedulable units and freeze ratio r, the floor(r * T) units with the lowest priority are
frozen and the rest train. A unit's priority is its score (stale for frozen units) times its age,
the steps since it last trained, raised to ``age_exponent``:

* ``age_exponent: 0`` (SlimFit's reference): priority = score. Units whose score stays high
  train at nearly every step; the others wait until every higher score has gone stale below theirs.
* ``age_exponent: 1``: a unit waits about (threshold / score) steps, so it trains at a rate
  proportional to its score and no unit is starved.
* ``age_exponent: 2``: waiting counts more than the score, so the tensors take turns.
* ``age_exponent: 1.5`` (the recipe's default for decoder SFT, ``configs/sft.yaml``): between
  the two. On SmolLM2 (3 seeds a task, ``benchmarks/RESULTS.md``, "The SFT default") 2 ended
  lowest in held-out loss on a text-continuation task but 2.3 points below full fine-tuning in
  exact match on one-word answers, 1 the other way round; 1.5 was within 1% and 1 point of full
  fine-tuning on both.

``budget`` says what the freeze ratio counts:

* ``units`` (the reference): floor(r * T) units are frozen, whatever their size. The memory one
  step needs then depends on which units win: the word embeddings (a fifth of BERT-base, a
  tenth of a Llama) and nine small matrices are "20% of units" as much as twenty norm scales.
* ``parameters``: the units trained in a step hold at most (1 - r) of the schedulable parameters.
  Units are taken in priority order and one that no longer fits is passed over for smaller ones,
  so the gradients and resident optimizer state of a step are bounded by the ratio, which is
  what makes its memory predictable. A unit larger than the whole budget never trains:
  ``never_trained`` names it, and SlimFit says so at start-up, in its summary and its report.
  ``units.row_chunks`` splits vocabulary-sized matrices (MiniLM's word embeddings are half its
  parameters) into row units no larger than the largest other unit, which do fit.

Units never trained have huge random scores, so every unit trains once, in a seeded random
order, before any trains twice (under ``parameters``, every unit that fits the budget).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, Sequence

from slimfit_accel.hookspecs import ScheduleContext, UnitInfo, hookimpl


@dataclass
class ILS:
    """Inter-layer scheduling (SlimFit). ``freeze_ratio`` in [0, 1): the share frozen, of units
    or of parameters (``budget``); ``age_exponent`` >= 0: how strongly waiting raises a unit's
    priority (0: the reference)."""

    freeze_ratio: float = 0.9
    age_exponent: float = 0.0
    budget: Literal["units", "parameters"] = "units"

    def __post_init__(self) -> None:
        if not 0.0 <= self.freeze_ratio < 1.0:
            raise ValueError(f"freeze_ratio must be in [0, 1), got {self.freeze_ratio}")
        if not 0.0 <= self.age_exponent <= 8.0:
            raise ValueError(f"age_exponent must be in [0, 8], got {self.age_exponent}")
        if self.budget not in ("units", "parameters"):
            raise ValueError(f"budget must be 'units' or 'parameters', got {self.budget!r}")

    def select(self, ctx: ScheduleContext) -> list[str]:
        names = [unit.name for unit in ctx.units]
        priority = [self._priority(ctx, name) for name in names]
        if self.budget == "parameters":
            return self._within_budget(ctx, priority)
        n_frozen = math.floor(self.freeze_ratio * len(names) + 1e-9)
        # Ascending priority; ties go to the unit defined first, so the choice is deterministic.
        lowest_first = sorted(range(len(names)), key=lambda i: (priority[i], i))
        frozen = set(lowest_first[:n_frozen])
        return [name for i, name in enumerate(names) if i not in frozen]

    def step_budget(self, numels: Sequence[int]) -> int:
        """With ``budget: parameters``, the most parameters one step may train among units of
        these sizes: (1 - freeze_ratio) of their total."""
        return math.floor((1.0 - self.freeze_ratio) * sum(numels) + 1e-6)

    def never_trained(self, units: Sequence[UnitInfo]) -> dict[str, str]:
        """With ``budget: parameters``, the units larger than the whole step budget: never picked."""
        if self.budget != "parameters":
            return {}
        budget = self.step_budget([u.numel for u in units])
        return {
            u.name: f"{u.numel:,d} parameters, more than the step budget of {budget:,d} (1 - freeze_ratio {self.freeze_ratio})"
            for u in units
            if u.numel > budget
        }

    def _within_budget(self, ctx: ScheduleContext, priority: list[float]) -> list[str]:
        """Highest priority first, each unit that still fits (1 - freeze_ratio) of the parameters."""
        units = ctx.units
        budget = self.step_budget([u.numel for u in units])
        if len(self.never_trained(units)) == len(units):
            raise ValueError(
                f"freeze_ratio {self.freeze_ratio} with budget 'parameters' leaves {budget:,.0f} parameters a "
                f"step, less than the smallest unit ({min(u.numel for u in units):,}); lower freeze_ratio"
            )
        chosen, used = set(), 0
        for i in sorted(range(len(units)), key=lambda i: (-priority[i], i)):
            if used + units[i].numel <= budget:
                chosen.add(i)
                used += units[i].numel
        return [u.name for i, u in enumerate(units) if i in chosen]

    def _priority(self, ctx: ScheduleContext, name: str) -> float:
        score = ctx.scores[name]
        if self.age_exponent == 0.0:
            return score
        age = ctx.step - ctx.last_trained.get(name, -1)
        return score * float(age) ** self.age_exponent


@hookimpl
def register_schedulers(register):
    register("ils", ILS)
