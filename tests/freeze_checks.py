"""Check that a step left the frozen units' weights and optimizer state bit-identical."""

from __future__ import annotations

import torch


def snapshot(params, optimizer):
    """Clones of the params and their optimizer state, keyed by position."""
    return [
        (p.detach().clone(), {k: v.clone() if torch.is_tensor(v) else v for k, v in optimizer.state.get(p, {}).items()})
        for p in params
    ]


def unchanged(params, optimizer, before) -> bool:
    for p, (weight, state) in zip(params, before):
        if not torch.equal(p.detach(), weight):
            return False
        now = optimizer.state.get(p, {})
        if now.keys() != state.keys():
            return False
        for key, value in state.items():
            same = torch.equal(now[key], value) if torch.is_tensor(value) else now[key] == value
            if not same:
                return False
    return True


def frozen_and_trained(slimfit):
    trainable = set(slimfit.controller.trainable)
    frozen = [p for u in slimfit.units.schedulable if u.name not in trainable for p in u.params]
    trained = [p for u in slimfit.units.all if u.name in trainable or u in slimfit.units.always_trained for p in u.params]
    return frozen, trained
