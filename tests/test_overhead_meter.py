"""memory_meter: off runs none of the meter's code, {every: N} measures only every N-th step."""

from __future__ import annotations

import pytest
import torch

from slimfit_accel import SlimFit
from slimfit_accel.config import DEFAULT_METER_EVERY, load_config
from slimfit_accel.errors import ConfigError

from conftest import random_batch, tiny_bert


def _saved_tensor_hooks() -> tuple | None:
    """The innermost saved-tensor hooks autograd would call now (None: none installed)."""
    return torch._C._autograd._top_saved_tensors_default_hooks(False)  # noqa: SLF001


def run(memory_meter, steps: int, compression: str = "none"):
    """Train a tiny BERT ``steps`` steps; returns the SlimFit and, per step, whether autograd had
    saved-tensor hooks installed during the forward pass."""
    model = tiny_bert()
    config = {"scheduler": {"name": "ils", "freeze_ratio": 0.5}, "compression": compression}
    if memory_meter is not None:
        config["memory_meter"] = memory_meter
    slimfit = SlimFit.from_config(config)
    model = slimfit.prepare_model(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    slimfit.attach(None, model, optimizer, total_steps=steps)
    hooked: list[bool] = []
    seen_in_step: list[bool] = []
    handle = model.bert.encoder.layer[0].register_forward_hook(lambda *_: seen_in_step.append(_saved_tensor_hooks() is not None))
    batch = random_batch()
    for _ in range(steps):
        seen_in_step.clear()
        with slimfit.step():
            model(**batch).loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        hooked.append(any(seen_in_step))
    handle.remove()
    return slimfit, hooked


def test_meter_off_installs_no_hooks_and_report_says_not_measured():
    slimfit, hooked = run("off", steps=3)
    assert slimfit.memory is None
    assert hooked == [False, False, False]  # compression off and meter off: autograd saves plainly
    report = slimfit.report()
    assert report.memory is None
    assert "memory not measured" in report.memory_note and "memory_meter: off" in report.memory_note
    text = report.render()
    assert "memory not measured" in text and "Memory by category" not in text
    assert report.to_dict()["memory"] is None


def test_meter_off_with_compression_leaves_only_the_engines_hooks():
    slimfit, hooked = run("off", steps=2, compression="slimfit")
    assert slimfit.memory is None and hooked == [True, True]
    assert slimfit.compression._counter.listeners == []  # noqa: SLF001 (no meter listening)


def test_sampled_meter_measures_every_nth_step_only():
    slimfit, hooked = run({"every": 3}, steps=7)
    # the meter's counting engine hooks autograd in the measured steps 0, 3, 6 only
    assert hooked == [True, False, False, True, False, False, True]
    report = slimfit.report().memory
    assert report.steps == 3 and report.every == 3
    assert report.last.optimizer_step == 6
    assert 0 < report.last.activations_raw == report.last.activations  # counted, not compressed
    assert report.last.grads > 0 and report.last.optimizer > 0
    assert "measured every 3 optimizer steps" in " ".join(report.render(width=200).split())
    # between measured steps nothing of the meter stays installed
    assert not slimfit.memory._hooked and not slimfit.memory._grads._handles  # noqa: SLF001


def test_sampled_figures_equal_the_always_meter_on_the_measured_steps():
    sampled, _ = run({"every": 2}, steps=5)
    always, hooked = run("always", steps=5)
    assert hooked == [True] * 5
    assert always.report().memory.steps == 5 and sampled.report().memory.steps == 3
    a, s = always.report().memory.last, sampled.report().memory.last  # both step 4
    assert (a.optimizer_step, s.optimizer_step) == (4, 4)
    for name in ("params", "grads", "optimizer", "activations", "activations_raw", "total"):
        assert getattr(a, name) == getattr(s, name), name


def test_default_is_sampled_and_shorthands():
    assert load_config({}).meter_every == DEFAULT_METER_EVERY > 1
    assert [load_config({"memory_meter": v}).meter_every for v in ("always", "off", True, False, 4)] == [1, 0, 1, 0, 4]
    with pytest.raises(ConfigError, match="memory_meter"):
        load_config({"memory_meter": "sometimes"})
    with pytest.raises(ConfigError, match="greater than or equal to 1"):
        load_config({"memory_meter": {"every": 0}})
    slimfit = SlimFit.from_config({"memory_meter": "off"}, memory_meter="always")
    assert slimfit.config.meter_every == 1
