"""Drive a FreezeController over a toy model with real optimizer steps, recording decisions."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from slimfit_accel import UnitsConfig, hookimpl
from slimfit_accel.config import StrategySpec
from slimfit_accel.controller import FreezeController
from slimfit_accel.plugins import StrategyRegistry
from slimfit_accel.stepping import TorchStepBackend
from slimfit_accel.units import discover_units

from conftest import random_batch


def chain(n: int = 5, width: int = 4) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(*[nn.Linear(width, width, bias=False) for _ in range(n)])


@dataclass
class TableScorer:
    """Scores from a table, times ``decay`` each time a unit is trained again (staleness)."""

    table: dict[str, float] = field(default_factory=dict)
    times: dict[str, int] = field(default_factory=dict)
    decay: float = 0.5

    def before_step(self, views):
        return None

    def after_step(self, views, carried):
        out = []
        for view in views:
            k = self.times.get(view.name, 0)
            self.times[view.name] = k + 1
            out.append(self.table[view.name] * self.decay**k)
        return torch.tensor(out, dtype=torch.float64)


class TablePlugin:
    @hookimpl
    def register_scorers(self, register):
        register("table", TableScorer)


def run(model, scheduler: dict, steps: int, scorer: dict | None = None, units: UnitsConfig | None = None,
        initial_scores=None, total_steps=None, seed: int = 0, extra_plugins=()):
    registry = StrategyRegistry.load([TablePlugin(), *extra_plugins])
    scorer = registry.build("scorer", StrategySpec(**(scorer or {"name": "weight_delta"})))
    scheduler = registry.build("scheduler", StrategySpec(**scheduler))
    unit_set = discover_units(model, units or UnitsConfig())
    controller = FreezeController(unit_set, scorer, scheduler, registry, seed=seed, total_steps=total_steps)
    if initial_scores is not None:
        controller.scores = torch.tensor(initial_scores, dtype=torch.float64)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    controller.bind(TorchStepBackend(optimizer))
    decisions, controller.snapshot_history = [], []
    for step in range(steps):
        controller.begin_step()
        decisions.append(set(controller.trainable))
        if isinstance(model, nn.Sequential):
            loss = model(torch.randn(3, model[0].in_features)).pow(2).mean()
        else:
            loss = model(**random_batch(seed=step)).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        controller.snapshot_history.append(controller.last_snapshot_bytes)
    return decisions, controller
