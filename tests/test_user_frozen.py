"""Parameters the user froze before prepare_model stay frozen: never units, never moved."""

from __future__ import annotations

import pytest
import torch
from accelerate import Accelerator

from slimfit_accel import ConfigError, SlimFit

from conftest import random_batch, tiny_bert

USER_FROZEN = [
    "bert.embeddings.word_embeddings.weight",      # a weight that would be a unit
    "bert.encoder.layer.0.attention.self.query.weight",
    "bert.encoder.layer.0.attention.self.query.bias",  # a bias (never a unit)
    "bert.encoder.layer.1.output.LayerNorm.weight",  # a norm scale (a unit by default)
]
CONFIG = {"scheduler": {"name": "ils", "freeze_ratio": 0.5}, "units": {"always_train": ["classifier.*"]}}


def frozen_model():
    model = tiny_bert()
    params = dict(model.named_parameters())
    for name in USER_FROZEN:
        params[name].requires_grad_(False)
    return model, params


def test_user_frozen_parameters_are_bit_identical_after_20_steps():
    slimfit = SlimFit.from_config(CONFIG)
    model, params = frozen_model()
    before = {name: params[name].detach().clone() for name in USER_FROZEN}
    model = slimfit.prepare_model(model)
    unit_params = {n for u in slimfit.units.all for n in u.param_names}
    assert not unit_params & set(USER_FROZEN)
    assert all(not params[n].requires_grad for n in USER_FROZEN)

    accelerator = Accelerator(cpu=True)
    # The usual user code passes every parameter, frozen ones included, to the optimizer.
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    model, optimizer = accelerator.prepare(model, optimizer)
    slimfit.attach(accelerator, model, optimizer)
    trained = set()
    for step in range(20):
        with slimfit.step():
            assert all(not params[n].requires_grad for n in USER_FROZEN)
            trained.update(slimfit.controller.trainable)
            loss = model(**random_batch(seed=step)).loss
            accelerator.backward(loss)
            assert all(params[n].grad is None for n in USER_FROZEN)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    assert slimfit.controller.step == 20 and len(trained) > 1
    for name in USER_FROZEN:
        assert torch.equal(params[name].detach(), before[name]), name
        assert params[name] not in optimizer.optimizer.state
    slimfit.detach()
    assert all(not params[n].requires_grad for n in USER_FROZEN)
    assert all(p.requires_grad for n, p in params.items() if n not in USER_FROZEN)


def test_candidates_all_makes_the_whole_model_candidate():
    slimfit = SlimFit.from_config({**CONFIG, "units": {**CONFIG["units"], "candidates": "all"}})
    model, params = frozen_model()
    slimfit.prepare_model(model)
    unit_params = {n for u in slimfit.units.all for n in u.param_names}
    assert {n for n in USER_FROZEN if not n.endswith("bias")} <= unit_params
    assert params["bert.embeddings.word_embeddings.weight"].requires_grad
    assert not params["bert.encoder.layer.0.attention.self.query.bias"].requires_grad  # not a unit: as the user set it


def test_always_train_pattern_on_a_user_frozen_head_says_why():
    slimfit = SlimFit.from_config(CONFIG)
    model = tiny_bert()
    model.classifier.requires_grad_(False)
    with pytest.raises(ConfigError, match=r"frozen before prepare_model .*candidates: all"):
        slimfit.prepare_model(model)


def test_every_parameter_frozen_says_why():
    model = tiny_bert()
    model.requires_grad_(False)
    with pytest.raises(ConfigError, match=r"requires_grad=False"):
        SlimFit.from_config({}).prepare_model(model)


def test_summary_counts_without_peft():
    slimfit = SlimFit.from_config(CONFIG)
    model, params = frozen_model()
    slimfit.prepare_model(model)
    summary = slimfit.summary()
    assert summary.total == sum(p.numel() for p in model.parameters())
    assert summary.trainable == sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert summary.candidates == sum(u.numel for u in slimfit.units.schedulable)
    assert summary.always_trained == summary.trainable - summary.candidates
    assert summary.trained_this_step == summary.trainable  # not attached: nothing frozen yet
    assert str(summary).startswith(f"trainable params: {summary.trainable:,d} || all params: {summary.total:,d}")
