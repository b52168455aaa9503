"""``weight_delta``: SlimFit's score, the mean relative change of a unit's weights in its step.

score = mean over elements of |W_before - W_after| / |W_before|; elements with W_before == 0
contribute 0 (the relative change is undefined there). Only the units trained in the step are
snapshotted, right before the optimizer step, so scoring memory is the trained units' bytes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from slimfit_accel.hookspecs import UnitView, hookimpl


@dataclass
class WeightDelta:
    """Relative weight change per element, averaged over the unit (SlimFit).

    ``relative: false`` scores the absolute change instead (mean |W_before - W_after|).
    """

    relative: bool = True

    def before_step(self, views: Sequence[UnitView]) -> list[list[torch.Tensor]]:
        return [[w.detach().clone() for w in view.weights] for view in views]

    def after_step(self, views: Sequence[UnitView], before: list[list[torch.Tensor]]) -> torch.Tensor:
        scores = []
        for view, snapshots in zip(views, before):
            total = torch.zeros((), dtype=torch.float32, device=_device(view))
            count = 0
            for after, old in zip(view.weights, snapshots):
                # In place on fresh temporaries: a step's trained units are a fifth of the model,
                # so each full-size pass saved here is felt at every step.
                change = torch.sub(old, after).abs_().float()
                if self.relative:
                    magnitude = old.abs().float()
                    positive = magnitude > 0  # W_before == 0 contributes 0
                    change = torch.where(positive, change.div_(magnitude.clamp_min_(torch.finfo(torch.float32).tiny)), 0.0)
                total = total + change.sum()
                count += old.numel()
            scores.append(total / max(count, 1))
        return torch.stack(scores)


def _device(view: UnitView) -> torch.device:
    return view.weights[0].device if view.weights else torch.device("cpu")


@hookimpl
def register_scorers(register):
    register("weight_delta", WeightDelta)
