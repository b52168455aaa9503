"""Built-in scorers on hand-computed values, and the scoring memory bound."""

from __future__ import annotations

import pytest
import torch

from slimfit_accel.hookspecs import UnitView
from slimfit_accel.strategies.scoring.grad_norm import GradNorm
from slimfit_accel.strategies.scoring.random_score import RandomScore
from slimfit_accel.strategies.scoring.weight_delta import WeightDelta
from slimfit_accel.units import unit_bytes

from strategy_harness import chain, run


def test_weight_delta_is_mean_relative_change():
    weight = torch.tensor([1.0, -2.0, 0.0, 4.0])
    view = UnitView(name="w", weights=[weight])
    scorer = WeightDelta()
    carried = scorer.before_step([view])
    weight.copy_(torch.tensor([1.5, -2.0, 0.3, 3.0]))
    # |.5|/1, 0/2, (W_before == 0: 0), |1|/4 -> (0.5 + 0 + 0 + 0.25) / 4
    assert torch.allclose(scorer.after_step([view], carried), torch.tensor([0.1875]))


def test_weight_delta_absolute_is_mean_change():
    weight = torch.tensor([1.0, -2.0, 0.0, 4.0])
    view = UnitView(name="w", weights=[weight])
    scorer = WeightDelta(relative=False)
    carried = scorer.before_step([view])
    weight.copy_(torch.tensor([1.5, -2.0, 0.3, 3.0]))
    # .5 + 0 + .3 + 1 over 4 elements
    assert torch.allclose(scorer.after_step([view], carried), torch.tensor([0.45]))


def test_weight_delta_spans_every_tensor_of_a_unit():
    a, b = torch.tensor([2.0, 2.0]), torch.tensor([[1.0], [1.0]])
    view = UnitView(name="u", weights=[a, b])
    scorer = WeightDelta()
    carried = scorer.before_step([view])
    a.add_(1.0)  # relative change .5 on two elements; b unchanged
    assert torch.allclose(scorer.after_step([view], carried), torch.tensor([0.25]))


def test_grad_norm_is_mean_squared_gradient():
    view = UnitView(name="u", weights=[torch.zeros(4)], grads=[torch.tensor([1.0, 2.0, 3.0, 0.0])])
    missing = UnitView(name="v", weights=[torch.zeros(2)], grads=[None])
    scorer = GradNorm()
    scores = scorer.after_step([view, missing], scorer.before_step([view, missing]))
    assert torch.allclose(scores, torch.tensor([14.0 / 4, 0.0]))


def test_random_scorer_is_reproducible_and_resumable():
    views = [UnitView(name=str(i), weights=[torch.zeros(1)]) for i in range(3)]
    a, b = RandomScore(seed=7), RandomScore(seed=7)
    assert torch.equal(a.after_step(views, None), b.after_step(views, None))
    state = a.state_dict()
    expected = a.after_step(views, None)
    c = RandomScore(seed=99)
    c.load_state_dict(state)
    assert torch.equal(c.after_step(views, None), expected)


def test_scores_are_those_of_the_trained_units_after_each_step():
    decisions, controller = run(chain(), {"name": "ils", "freeze_ratio": 0.6}, steps=4, scorer={"name": "grad_norm"})
    assert all(len(d) == 2 for d in decisions)
    trained = set().union(*decisions)
    for i, name in enumerate(f"{k}.weight" for k in range(5)):
        assert (controller.scores[i].item() < 1e29) == (name in trained)


def test_snapshot_holds_exactly_the_trained_units_bytes():
    decisions, controller = run(chain(10, width=6), {"name": "ils", "freeze_ratio": 0.8}, steps=4)
    by_name = {u.name: u for u in controller.units.schedulable}
    model_bytes = unit_bytes(controller.units.all)
    for snapshot, decided in zip(controller.snapshot_history, decisions):
        assert snapshot == unit_bytes([by_name[n] for n in decided])
        assert snapshot == model_bytes * 2 // 10  # 2 of 10 equal units, not the model


def _weight_delta_before_in_place(views, before, relative):
    """The scorer's arithmetic before it worked in place (fresh temporaries), frozen here."""
    scores = []
    for view, snapshots in zip(views, before):
        total, count = torch.zeros(()), 0
        for after, old in zip(view.weights, snapshots):
            change = (old - after).abs().float()
            if relative:
                magnitude = old.abs().float()
                change = torch.where(magnitude > 0, change / magnitude.clamp_min(torch.finfo(torch.float32).tiny), 0.0)
            total = total + change.sum()
            count += old.numel()
        scores.append(total / max(count, 1))
    return torch.stack(scores)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("relative", [True, False])
def test_weight_delta_in_place_scores_are_bit_identical(dtype, relative):
    gen = torch.Generator().manual_seed(5)
    weights = [torch.randn(64, 33, generator=gen).to(dtype), torch.randn(7, generator=gen).to(dtype)]
    weights[0][3] = 0.0  # W_before == 0 contributes 0
    weights[0][4, :5] = 1e-40  # subnormal magnitudes (clamped to the smallest normal)
    views = [UnitView(name="a", weights=weights[:1]), UnitView(name="b", weights=weights)]
    scorer = WeightDelta(relative=relative)
    carried = scorer.before_step(views)
    snapshots = [[w.clone() for w in ws] for ws in carried]
    for w in weights:
        w.add_(torch.randn(w.shape, generator=gen).to(dtype) * 1e-3)
    scores = scorer.after_step(views, carried)
    assert torch.equal(scores, _weight_delta_before_in_place(views, snapshots, relative))
    assert all(torch.equal(a, b) for xs, ys in zip(carried, snapshots) for a, b in zip(xs, ys))  # snapshots untouched
