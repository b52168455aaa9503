"""PEFT LoRA + SlimFit: the scheduler picks among adapter tensors; the base model never trains."""

from __future__ import annotations

import contextlib
import io

import pytest
import torch
from accelerate import Accelerator

from slimfit_accel import ConfigError, SlimFit

from conftest import random_batch, tiny_bert

peft = pytest.importorskip("peft")


def lora_model():
    config = peft.LoraConfig(task_type="SEQ_CLS", r=4, target_modules=["query", "value"])
    return peft.get_peft_model(tiny_bert(), config)  # modules_to_save: the classifier head


def is_adapter(name: str) -> bool:
    return ".lora_" in name or ".modules_to_save." in name


@pytest.mark.parametrize("always_train", ["head", "*classifier*"])
def test_lora_slimfit_trains_only_adapters_and_head(always_train):
    model = lora_model()
    names = {id(p): n for n, p in model.named_parameters()}
    base = {n: p for n, p in model.named_parameters() if not p.requires_grad}
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    slimfit = SlimFit.from_config(
        {"scheduler": {"name": "ils", "freeze_ratio": 0.5}, "units": {"always_train": [always_train]}}
    )
    model = slimfit.prepare_model(model)
    assert all(is_adapter(n) for u in slimfit.units.all for n in u.param_names)
    assert [u.name for u in slimfit.units.always_trained] == ["base_model.model.classifier.modules_to_save.default.weight"]
    assert len(slimfit.units.schedulable) == 8  # lora_A and lora_B of query and value in 2 layers
    assert all(not p.requires_grad for p in base.values())

    accelerator = Accelerator(cpu=True)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
    in_optimizer = {names[id(p)] for group in optimizer.param_groups for p in group["params"]}
    assert in_optimizer and all(is_adapter(n) for n in in_optimizer) and not in_optimizer & base.keys()
    model, optimizer = accelerator.prepare(model, optimizer)
    slimfit.attach(accelerator, model, optimizer)

    picked = set()
    for step in range(8):
        with slimfit.step():
            picked.update(slimfit.controller.trainable)
            trains_now = {n for n, p in model.named_parameters() if p.requires_grad}
            assert all(is_adapter(n) or n.endswith("modules_to_save.default.bias") for n in trains_now)
            loss = model(**random_batch(seed=step)).loss
            accelerator.backward(loss)
            assert all(p.grad is None for p in base.values())
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    assert len(picked) == 8  # every adapter tensor was scheduled at some step, and only those
    moved = {n for n, p in model.named_parameters() if not torch.equal(p.detach(), before[n])}
    assert moved and all(is_adapter(n) for n in moved)
    assert all(torch.equal(p.detach(), before[n]) for n, p in base.items())
    assert not any(p in optimizer.optimizer.state for p in base.values())

    # The compression engine sees the frozen base layers as frozen: every saved tensor it
    # classified under a LayerNorm, a LoRA base layer or the head's original copy was frozen.
    frozen_by_path = {(path, frozen) for path, _type, _role, frozen in slimfit.compression._choice}
    assert any(frozen for _, frozen in frozen_by_path)
    for path, frozen in frozen_by_path:
        if "LayerNorm" in path or "base_layer" in path or "original_module" in path:
            assert frozen, path
    slimfit.detach()
    assert all(not p.requires_grad for p in base.values())


def test_trainable_counts_match_peft():
    model = lora_model()
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        model.print_trainable_parameters()
    peft_line = printed.getvalue().strip()
    slimfit = SlimFit.from_config({"units": {"always_train": ["head"]}})
    slimfit.prepare_model(model)
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        slimfit.print_trainable_parameters()
    ours = printed.getvalue().strip()
    assert ours.startswith(peft_line + " || SlimFit candidates: ")
    summary = slimfit.summary()
    trainable, total = model.get_nb_trainable_parameters()
    assert (summary.trainable, summary.total) == (trainable, total)
    assert summary.candidates == sum(p.numel() for n, p in model.named_parameters() if ".lora_" in n)
    assert summary.always_trained == trainable - summary.candidates  # the head's weight and bias

    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    slimfit.attach(None, model, optimizer)
    picked = sum(u.numel for u in slimfit.units.schedulable if u.name in slimfit.controller.trainable)
    assert slimfit.summary().trained_this_step == summary.always_trained + picked < trainable
    slimfit.detach()


def test_unprefixed_pattern_on_a_peft_model_suggests_the_glob():
    with pytest.raises(ConfigError, match=r"names are prefixed.*Write '\*classifier\.\*' instead"):
        SlimFit.from_config({"units": {"always_train": ["classifier.*"]}}).prepare_model(lora_model())
