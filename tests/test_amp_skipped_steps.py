"""fp16 loss scaling with fused and foreach AdamW: a step the GradScaler skips is no SlimFit step.

For ``fused=True`` optimizers ``GradScaler.step`` still calls ``optimizer.step()`` on an overflow
(the fused kernel skips the update itself, told by ``optimizer.found_inf``), and it leaves the
gradients scaled (the kernel divides by ``optimizer.grad_scale``). SlimFit must read that
verdict: the step counter, update counts and scores stay put, and the units picked for the
skipped step train in the next real one. For foreach AdamW the scaler never calls the step.
One process, fp32 model, ``GradScaler("cpu")``: the scaler's code path is the one used on a GPU.
"""

from __future__ import annotations

import pytest
import torch

from slimfit_accel import SlimFit

from conftest import random_batch, tiny_bert

CLEAN_STEPS = 12


def _train(kind: str, scorer: str = "weight_delta", paging: bool = False, overflow_at: int | None = 0):
    slimfit = SlimFit.from_config({
        "seed": 3, "scheduler": {"name": "ils", "freeze_ratio": 0.5}, "scorer": {"name": scorer},
        "compression": "none", "optimizer_paging": paging,
    })
    model = slimfit.prepare_model(tiny_bert())
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, **{kind: True})
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    slimfit.attach(None, model, optimizer)
    controller = slimfit.controller
    units = slimfit.units.schedulable
    moved = {u.name: 0 for u in units}  # steps in which the unit's weights really changed
    record: dict = {}
    for micro in range(CLEAN_STEPS + (overflow_at is not None)):
        before = {u.name: [p.detach().clone() for p in u.params] for u in units}
        state = (controller.step, controller.scores.clone(), dict(controller.stats.trained_steps))
        torch.manual_seed(controller.step)  # dropout masks, too, follow the real step
        with slimfit.step():
            loss = model(**random_batch(seed=controller.step % 4)).loss  # same data per real step
            if micro == overflow_at:
                loss = loss * float("inf")
            scaler.scale(loss).backward()
        scale = scaler.get_scale()
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        changed = {u.name for u in units if any(not torch.equal(a, p) for a, p in zip(before[u.name], u.params))}
        for name in changed:
            moved[name] += 1
        if micro == overflow_at:
            record["overflow"] = {
                "skipped": scaler.get_scale() < scale,
                "picked": set(controller.trainable),
                "changed": changed,
                "step": (state[0], controller.step),
                "scores_unchanged": torch.equal(state[1], controller.scores),
                "trained_steps_unchanged": state[2] == controller.stats.trained_steps,
            }
    record.update(step=controller.step, trained=dict(controller.stats.trained_steps), moved=moved,
                  scores=controller.scores.clone(), lr=optimizer.param_groups[0]["lr"])
    slimfit.detach()
    return record


@pytest.mark.parametrize("kind, scorer, paging", [
    ("fused", "weight_delta", False),
    ("fused", "grad_norm", False),
    ("fused", "weight_delta", True),
    ("foreach", "weight_delta", False),
    ("foreach", "grad_norm", True),
])
def test_skipped_step_is_not_counted_and_its_units_train_later(kind, scorer, paging):
    record = _train(kind, scorer, paging)
    overflow = record["overflow"]
    assert overflow["skipped"], "the scaler should have found inf gradients and backed off"
    assert overflow["changed"] == set(), "a skipped step moved weights"
    assert overflow["step"] == (0, 0)
    assert overflow["scores_unchanged"] and overflow["trained_steps_unchanged"]
    assert record["step"] == CLEAN_STEPS
    # What the controller counts is what really trained, step by step.
    assert record["trained"] == record["moved"]
    assert all(record["trained"][name] > 0 for name in overflow["picked"]), record["trained"]
    # Loss scales are powers of two, so the run is the same as one in which the skipped step
    # never happened: same units trained as often, same scores.
    reference = _train(kind, scorer, paging, overflow_at=None)
    assert record["trained"] == reference["trained"]
    torch.testing.assert_close(record["scores"], reference["scores"], rtol=1e-6, atol=0.0)
    assert record["lr"] == 1e-3

def test_grad_norm_reads_unscaled_gradients_under_the_fused_kernel():
    # The fused kernel unscales inside the step; the foreach path gets gradients unscaled by
    # the scaler before it. Scores must not depend on which (nor on the loss scale).
    fused = _train("fused", "grad_norm", overflow_at=None)
    foreach = _train("foreach", "grad_norm", overflow_at=None)
    assert fused["trained"] == foreach["trained"]
    torch.testing.assert_close(fused["scores"], foreach["scores"], rtol=1e-3, atol=0.0)
