"""Frozen means frozen: weights and optimizer state of frozen units are bit-identical after a step."""

from __future__ import annotations

import pytest
import torch
from accelerate import Accelerator

from slimfit_accel import SlimFit

from conftest import random_batch, tiny_bert
from freeze_checks import frozen_and_trained, snapshot, unchanged

OPTIMIZERS = {
    "adamw": lambda params: torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1),
    "sgd": lambda params: torch.optim.SGD(params, lr=1e-2, momentum=0.9, weight_decay=0.1),
}


@pytest.mark.parametrize("optimizer_name", sorted(OPTIMIZERS))
@pytest.mark.parametrize("set_to_none", [True, False])
def test_frozen_units_do_not_move_with_accumulation(optimizer_name, set_to_none):
    slimfit = SlimFit.from_config({"scheduler": {"name": "ils", "freeze_ratio": 0.8}, "units": {"always_train": ["classifier.*"]}})
    model = slimfit.prepare_model(tiny_bert())
    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=2)
    optimizer = OPTIMIZERS[optimizer_name](model.parameters())
    model, optimizer = accelerator.prepare(model, optimizer)
    slimfit.attach(accelerator, model, optimizer)
    inner = optimizer.optimizer
    checked_steps = 0
    for micro in range(12):
        with accelerator.accumulate(model), slimfit.step():
            if micro % 2 == 0:  # first micro-batch of an optimizer step
                frozen, trained = frozen_and_trained(slimfit)
                decided = slimfit.controller.trainable
                before_frozen = snapshot(frozen, inner)
                before_trained = snapshot(trained, inner)
            assert slimfit.controller.trainable == decided  # one decision per optimizer step
            loss = model(**random_batch(seed=micro)).loss
            accelerator.backward(loss)
            optimizer.step()
            optimizer.zero_grad(set_to_none=set_to_none)
        if accelerator.sync_gradients:
            assert unchanged(frozen, inner, before_frozen)
            assert all(p.grad is None for p in frozen) or not set_to_none
            moved = [not torch.equal(p.detach(), w) for p, (w, _) in zip(trained, before_trained)]
            assert sum(moved) >= len(trained) - 1  # trained units move
            checked_steps += 1
    assert checked_steps == 6 and slimfit.controller.step == 6
    # across the run, later steps froze units trained earlier: the check covered stale state
    assert len([n for n, k in slimfit.controller.stats.trained_steps.items() if k > 0]) > len(slimfit.controller.trainable)


def test_without_freezing_a_zero_gradient_still_moves_adamw_weights():
    # Why the backend drops frozen gradients: zero-filled grads are not the same as None.
    param = torch.nn.Parameter(torch.ones(3))
    optimizer = torch.optim.AdamW([param], lr=0.1, weight_decay=0.1)
    param.grad = torch.ones(3)
    optimizer.step()
    before = param.detach().clone()
    param.grad = torch.zeros(3)
    optimizer.step()
    assert not torch.equal(param.detach(), before)
