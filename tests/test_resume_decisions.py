"""When decisions are taken and announced, and what the model shows between steps (in-process, fast)."""

from __future__ import annotations

import pytest
import torch

from slimfit_accel import SlimFit, hookimpl
from slimfit_accel.errors import PluginError

from conftest import random_batch, tiny_bert


class Observer:
    def __init__(self):
        self.__name__ = "observer"
        self.decided: list[int] = []

    @hookimpl
    def slimfit_freeze_decision(self, step, trainable, frozen):
        self.decided.append(step)


class EmptyAt:
    """Plugin with a scheduler that selects nothing from step ``at`` on."""

    def __init__(self, at: int):
        self.__name__ = "empty_scheduler_plugin"
        self.at = at

    @hookimpl
    def register_schedulers(self, register):
        at = self.at

        class Empty:
            def select(self, ctx):
                return [] if ctx.step >= at else [u.name for u in ctx.units[:2]]

        register("empty_at", Empty)


def build(plugins, scheduler=None):
    config = {"scheduler": scheduler or {"name": "ils", "freeze_ratio": 0.75}, "compression": "none"}
    slimfit = SlimFit.from_config(config, plugins=plugins)
    model = slimfit.prepare_model(tiny_bert())
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    slimfit.attach(None, model, optimizer)
    return slimfit, model, optimizer


def one_step(slimfit, model, optimizer, seed=0):
    with slimfit.step():
        model(**random_batch(seed=seed)).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def test_decision_announced_when_its_step_begins_and_lifted_between_steps():
    observer = Observer()
    slimfit, model, optimizer = build([observer])
    assert observer.decided == []  # attach validated the scheduler but announced nothing
    units = [p for u in slimfit.units.all for p in u.params]
    with slimfit.step():
        assert observer.decided == [0]
        assert sum(not p.requires_grad for p in units) > 0  # the decision holds inside the step
        model(**random_batch()).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    assert all(p.requires_grad for p in units)  # between steps: the model's real trainable set
    one_step(slimfit, model, optimizer, seed=1)
    assert observer.decided == [0, 1]


def test_loading_state_after_attach_decides_the_loaded_step():
    observer = Observer()
    first, model, optimizer = build([])
    for seed in range(3):
        one_step(first, model, optimizer, seed)
    state = first.controller.state_dict()
    expected = first.controller._select()  # what step 3 will train

    resumed, model2, optimizer2 = build([observer])
    resumed.controller.load_state_dict(state)
    assert observer.decided == []
    with resumed.step():
        assert observer.decided == [3]
        assert set(resumed.controller.trainable) == expected


@pytest.mark.parametrize("at", [0, 2])
def test_scheduler_selecting_no_unit_is_an_error_naming_the_plugin(at):
    message = rf"plugin 'empty_scheduler_plugin': scheduler 'empty_at' selected no unit to train at step {at}"
    if at == 0:  # caught at attach, before any training
        with pytest.raises(PluginError, match=message):
            build([EmptyAt(at)], scheduler={"name": "empty_at"})
        return
    slimfit, model, optimizer = build([EmptyAt(at)], scheduler={"name": "empty_at"})
    for seed in range(at):
        one_step(slimfit, model, optimizer, seed)
    with pytest.raises(PluginError, match=message):
        one_step(slimfit, model, optimizer, at)
