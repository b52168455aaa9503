"""``lr_scale``: trained units take lr_scale-times larger steps; the optimizer's lr is restored."""

from __future__ import annotations

import importlib

import pytest
import torch

from slimfit_accel import SlimFit
from slimfit_accel.errors import ConfigError

from conftest import random_batch, tiny_bert


def _one_step(lr_scale: float):
    slimfit = SlimFit.from_config({
        "scheduler": {"name": "ils", "freeze_ratio": 0.5}, "lr_scale": lr_scale, "compression": "none",
        "units": {"always_train": ["classifier.*"]},
    })
    model = slimfit.prepare_model(tiny_bert())
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)  # plain SGD: the step is lr * grad
    slimfit.attach(None, model, optimizer)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with slimfit.step():
        model(**random_batch()).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    moved = {n: p.detach() - before[n] for n, p in model.named_parameters()}
    return moved, optimizer.param_groups[0]["lr"], set(slimfit.controller.stats.trained_steps)


def test_lr_scale_multiplies_the_step_and_restores_the_rate():
    base, lr_base, _ = _one_step(1.0)
    scaled, lr_after, _ = _one_step(3.0)
    assert lr_base == lr_after == 0.01  # the user's rate (and any LR scheduler) is untouched
    moved = [n for n, d in base.items() if d.abs().max() > 0]
    assert len(moved) < len(base)  # some units were frozen, and stay put under the scale too
    for name, delta in base.items():
        # float32 rounding of W + step: absolute error about eps * |W|
        torch.testing.assert_close(scaled[name], 3.0 * delta, rtol=1e-3, atol=1e-6)


@pytest.mark.parametrize("bad", [0, -1, 1000])
def test_lr_scale_out_of_range_is_a_config_error(bad):
    with pytest.raises(ConfigError, match="lr_scale"):
        SlimFit.from_config({"lr_scale": bad})



@pytest.mark.parametrize("paging", [False, True])
def test_lr_scale_is_restored_when_the_step_raises(paging, monkeypatch):
    seen, calls = [], []
    sgd_module = importlib.import_module("torch.optim.sgd")
    update = sgd_module.sgd

    def flaky_update(params, *args, **kwargs):  # SGD's update: raises once, as an out-of-memory would
        if not params:  # a call that updates nothing
            return update(params, *args, **kwargs)
        calls.append(kwargs["lr"])
        if len(calls) == 1:
            raise RuntimeError("out of memory")
        seen.append(kwargs["lr"])
        return update(params, *args, **kwargs)

    monkeypatch.setattr(sgd_module, "sgd", flaky_update)
    slimfit = SlimFit.from_config({
        "scheduler": {"name": "ils", "freeze_ratio": 0.5}, "lr_scale": 3.0, "compression": "none",
        "optimizer_paging": paging,
    })
    model = slimfit.prepare_model(tiny_bert())
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    slimfit.attach(None, model, optimizer)
    after, raised = [], 0
    for micro in range(4):
        with slimfit.step():
            model(**random_batch(seed=micro)).loss.backward()
        try:
            optimizer.step()
        except RuntimeError as err:  # a loop that skips a batch on out-of-memory
            assert "out of memory" in str(err)
            raised += 1
        optimizer.zero_grad(set_to_none=True)
        after.append(optimizer.param_groups[0]["lr"])
    assert raised == 1
    assert after == [0.01] * 4  # the user's rate, right after the failed step too
    assert seen and seen == [pytest.approx(0.03)] * len(seen), seen
    assert slimfit.controller.step == 3  # the failed step is not counted
