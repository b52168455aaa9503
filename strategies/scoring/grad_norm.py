"""``grad_norm``: score a unit by the size of its gradient in the step it was trained.

The score is the squared RMS of the gradient (mean of g^2 over the unit's elements): per element,
so large and small tensors compare fairly, and a mean, so ZeRO slices combine exactly.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from slimfit_accel.hookspecs import UnitView, hookimpl


@dataclass
class GradNorm:
    """Mean squared gradient of the unit, taken just before the optimizer step."""

    def before_step(self, views: Sequence[UnitView]) -> torch.Tensor:
        scores = []
        for view in views:
            device = view.weights[0].device if view.weights else torch.device("cpu")
            total = torch.zeros((), dtype=torch.float32, device=device)
            count = 0
            for weight, grad in zip(view.weights, view.grads):
                if grad is not None:
                    total = total + grad.detach().float().pow(2).sum()
                count += weight.numel()
            scores.append(total / max(count, 1))
        return torch.stack(scores) if scores else torch.zeros(0)

    def after_step(self, views: Sequence[UnitView], carried: torch.Tensor) -> torch.Tensor:
        return carried


@hookimpl
def register_scorers(register):
    register("grad_norm", GradNorm)
