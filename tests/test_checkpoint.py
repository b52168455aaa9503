"""accelerator.save_state / load_state: a resumed run continues the same freeze sequence."""

from __future__ import annotations

import torch
from accelerate import Accelerator

from slimfit_accel import SlimFit

from conftest import random_batch, tiny_bert

CONFIG = {"seed": 5, "scheduler": {"name": "ils", "freeze_ratio": 0.75}, "scorer": {"name": "random", "seed": 3}}


def setup():
    slimfit = SlimFit.from_config(CONFIG)
    model = slimfit.prepare_model(tiny_bert())
    accelerator = Accelerator(cpu=True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.01)
    model, optimizer = accelerator.prepare(model, optimizer)
    slimfit.attach(accelerator, model, optimizer)
    return slimfit, model, optimizer, accelerator


def train(slimfit, model, optimizer, accelerator, steps):
    decisions = []
    for _ in range(steps):
        with slimfit.step():
            decisions.append(slimfit.controller.trainable)
            loss = model(**random_batch(seed=slimfit.controller.step)).loss
            accelerator.backward(loss)
            optimizer.step()
            optimizer.zero_grad()
    return decisions


def test_resume_continues_the_same_freeze_sequence(tmp_path):
    straight = setup()
    expected = train(*straight, steps=8)

    first = setup()
    decisions = train(*first, steps=4)
    first[3].save_state(tmp_path / "ckpt")

    resumed = setup()
    resumed[3].load_state(tmp_path / "ckpt")
    assert resumed[0].controller.step == 4
    decisions += train(*resumed, steps=4)

    assert decisions == expected
    assert len(set(expected)) > 1
    assert torch.equal(resumed[0].controller.scores, straight[0].controller.scores)
    for a, b in zip(resumed[1].parameters(), straight[1].parameters()):
        assert torch.equal(a, b)
