"""``random``: a uniformly random score for each trained unit (a baseline for ablations)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch

from slimfit_accel.hookspecs import UnitView, hookimpl


@dataclass
class RandomScore:
    """Scores drawn from a generator seeded by ``seed``; its state is checkpointed."""

    seed: int = 0
    _generator: torch.Generator = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._generator = torch.Generator().manual_seed(self.seed)

    def before_step(self, views: Sequence[UnitView]) -> None:
        return None

    def after_step(self, views: Sequence[UnitView], carried: None) -> torch.Tensor:
        return torch.rand(len(views), generator=self._generator, dtype=torch.float64)

    def state_dict(self) -> dict:
        return {"generator": self._generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self._generator.set_state(state["generator"])


@hookimpl
def register_scorers(register):
    register("random", RandomScore)
