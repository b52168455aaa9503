"""Decisions of the built-in schedulers on small, hand-checked examples."""

from __future__ import annotations


import pytest

from slimfit_accel import UnitsConfig
from slimfit_accel.hookspecs import ScheduleContext, UnitInfo
from slimfit_accel.rng import derived_generator
from slimfit_accel.strategies.scheduling.ils import ILS

from conftest import tiny_bert
from strategy_harness import chain, run

NAMES = [f"{i}.weight" for i in range(5)]
TABLE = {"0.weight": 0.5, "1.weight": 0.1, "2.weight": 0.9, "3.weight": 0.3, "4.weight": 0.7}
DESCENDING_INIT = [5e30, 4e30, 3e30, 2e30, 1e30]


def ctx(scores: dict[str, float]) -> ScheduleContext:
    units = tuple(UnitInfo(name=n, index=i, block=None, numel=16) for i, n in enumerate(scores))
    return ScheduleContext(step=0, units=units, scores=scores, generator=derived_generator(0, 0), seed=0)


def named(*indices):
    return {NAMES[i] for i in indices}


def test_ils_freezes_lowest_fraction():
    scores = dict(zip(NAMES, [0.5, 0.1, 0.9, 0.3, 0.7]))
    assert set(ILS(0.6).select(ctx(scores))) == named(2, 4)  # floor(0.6*5)=3 lowest frozen: 1, 3, 0
    assert set(ILS(0.0).select(ctx(scores))) == set(NAMES)
    assert set(ILS(0.99).select(ctx(scores))) == named(2)  # floor(4.95)=4 frozen


def test_ils_ties_go_to_the_first_defined_unit():
    scores = dict.fromkeys(NAMES, 1.0)
    assert set(ILS(0.6).select(ctx(scores))) == named(3, 4)


def test_ils_reference_sequence_with_warmup_and_stale_scores():
    # Trace by hand (2 of 5 units train; a unit's k-th score is TABLE * 0.5**(k-1)):
    # step 0: untrained u0,u1 highest -> train; scores u0=.5 u1=.1
    # step 1: untrained u2,u3 -> train; u2=.9 u3=.3
    # step 2: untrained u4 + best trained u2(.9); u4=.7 u2=.45
    # step 3: u4(.7) u0(.5); u4=.35 u0=.25
    # step 4: u2(.45) u4(.35); u2=.225 u4=.175
    # step 5: u3(.3) u0(.25)
    decisions, controller = run(
        chain(), {"name": "ils", "freeze_ratio": 0.6}, steps=6,
        scorer={"name": "table", "table": TABLE}, initial_scores=DESCENDING_INIT,
    )
    assert decisions == [named(0, 1), named(2, 3), named(2, 4), named(0, 4), named(2, 4), named(0, 3)]
    # u1 was trained once, at step 0, and kept that stale score since
    assert controller.scores[1].item() == 0.1  # exact: float64 table value
    assert controller.stats.trained_steps["1.weight"] == 1


def test_ils_warmup_trains_every_unit_once_before_any_twice():
    decisions, _ = run(chain(7), {"name": "ils", "freeze_ratio": 0.7}, steps=4, seed=3)
    # 7 units, floor(4.9)=4 frozen, 3 train: steps 0-1 train 6 distinct units, step 2 the last one
    assert len(decisions[0] | decisions[1]) == 6
    assert (set(f"{i}.weight" for i in range(7)) - decisions[0] - decisions[1]) <= decisions[2]


def test_ils_ratio_zero_trains_everything_and_near_one_round_robins():
    decisions, _ = run(chain(), {"name": "ils", "freeze_ratio": 0.0}, steps=3)
    assert all(d == set(NAMES) for d in decisions)
    decisions, _ = run(chain(), {"name": "ils", "freeze_ratio": 0.99}, steps=5, initial_scores=DESCENDING_INIT)
    assert decisions == [named(i) for i in range(5)]


def test_initial_order_depends_on_seed_only():
    first, _ = run(chain(), {"name": "ils", "freeze_ratio": 0.8}, steps=5, seed=1)
    again, _ = run(chain(), {"name": "ils", "freeze_ratio": 0.8}, steps=5, seed=1)
    other, _ = run(chain(), {"name": "ils", "freeze_ratio": 0.8}, steps=5, seed=2)
    assert first == again
    assert first[:5] != other[:5]
    assert set().union(*first) == set(NAMES)


def test_random_layers_samples_blocks_per_interval():
    model = tiny_bert(layers=4)
    decisions, controller = run(model, {"name": "random_layers", "n_blocks": 2, "interval": 3}, steps=9,
                                units=UnitsConfig(always_train=["classifier.*"]))
    block_of = {u.name: u.block for u in controller.units.schedulable}
    outside = {n for n, b in block_of.items() if b is None}
    chosen = [{block_of[n] for n in d} - {None} for d in decisions]
    assert all(len(c) == 2 for c in chosen)
    assert all(outside <= d for d in decisions)
    for d, c in zip(decisions, chosen):  # whole blocks are trained
        assert d == outside | {n for n, b in block_of.items() if b in c}
    assert chosen[0] == chosen[1] == chosen[2] and chosen[3] == chosen[4] == chosen[5]
    assert len({frozenset(c) for c in chosen}) > 1
    again, _ = run(tiny_bert(layers=4), {"name": "random_layers", "n_blocks": 2, "interval": 3}, steps=9,
                   units=UnitsConfig(always_train=["classifier.*"]))
    assert again == decisions


def test_progressive_freezes_front_to_back():
    model = tiny_bert()
    decisions, controller = run(model, {"name": "progressive", "start": 0.5, "end": 0.9}, steps=10, total_steps=10)
    units = controller.units.schedulable
    embeddings = {u.name for u in units if u.block is None and u.name.startswith("bert.embeddings")}
    block0 = {u.name for u in units if u.block == 0}
    block1 = {u.name for u in units if u.block == 1}
    head = {u.name for u in units if u.block is None} - embeddings
    everything = embeddings | block0 | block1 | head
    # 4 stages; thresholds 0.5, 0.7, 0.9 of 10 steps
    assert decisions[:5] == [everything] * 5
    assert decisions[5] == decisions[6] == block0 | block1 | head
    assert decisions[7] == decisions[8] == block1 | head
    assert decisions[9] == head


def test_static_trains_matching_units_only():
    decisions, _ = run(chain(), {"name": "static", "train": ["3.*", "4.*"]}, steps=3)
    assert decisions == [named(3, 4)] * 3


def test_ils_age_exponent_weighs_score_by_steps_waited():
    # step 10; ages: u0 waited 1 step, u1 10, u2 1, u3 5, u4 2
    scores = dict(zip(NAMES, [0.5, 0.1, 0.9, 0.3, 0.7]))
    last = dict(zip(NAMES, [9, 0, 9, 5, 8]))
    units = tuple(UnitInfo(name=n, index=i, block=None, numel=16) for i, n in enumerate(NAMES))
    context = ScheduleContext(step=10, units=units, scores=scores, generator=derived_generator(0, 10), seed=0, last_trained=last)
    # priorities with exponent 1: .5, 1.0, .9, 1.5, 1.4 -> two highest are u3, u4
    assert set(ILS(0.6, age_exponent=1.0).select(context)) == named(3, 4)
    # exponent 0 is the reference: scores alone (u2 .9, u4 .7)
    assert set(ILS(0.6, age_exponent=0.0).select(context)) == named(2, 4)


def test_ils_age_exponent_spreads_updates_over_every_unit():
    # Reference ILS keeps training the units whose score stays high; with age_exponent 1 every
    # unit keeps training, at a rate that grows with its score.
    table = {"0.weight": 1.0, "1.weight": 0.9, "2.weight": 0.05, "3.weight": 0.04, "4.weight": 0.03}
    def counts(exponent):
        _, controller = run(
            chain(), {"name": "ils", "freeze_ratio": 0.6, "age_exponent": exponent}, steps=40,
            scorer={"name": "table", "table": table, "decay": 1.0}, initial_scores=DESCENDING_INIT,
        )
        return controller.stats.trained_steps
    reference, aged = counts(0.0), counts(1.0)
    assert min(reference.values()) == 1  # low scorers trained once, in the warm-up only
    # each waits about threshold / score steps: ~34 for the lowest score here, so trained again
    assert min(aged.values()) >= 2
    assert aged["0.weight"] > aged["2.weight"] > reference["2.weight"]  # still favours what moves most


def budget_ctx(numels: list[int], scores: list[float]) -> ScheduleContext:
    names = [f"{i}.weight" for i in range(len(numels))]
    units = tuple(UnitInfo(name=n, index=i, block=None, numel=k) for i, (n, k) in enumerate(zip(names, numels)))
    return ScheduleContext(step=0, units=units, scores=dict(zip(names, scores)), generator=derived_generator(0, 0), seed=0)


def test_ils_parameter_budget_bounds_what_one_step_trains():
    # 200 parameters, ratio 0.8: at most 40 train. Highest priority first; a unit that no longer
    # fits is passed over for smaller ones (u6, 60, never fits; u0, 100, neither).
    context = budget_ctx([100, 10, 10, 10, 5, 5, 60], [9, 8, 1, 7, 6, 0.5, 5])
    assert ILS(0.8, budget="parameters").never_trained(context.units) == {
        "0.weight": "100 parameters, more than the step budget of 40 (1 - freeze_ratio 0.8)",
        "6.weight": "60 parameters, more than the step budget of 40 (1 - freeze_ratio 0.8)",
    }
    assert ILS(0.8).never_trained(context.units) == {}  # by units, any unit can win
    chosen = ILS(0.8, budget="parameters").select(context)
    assert chosen == ["1.weight", "2.weight", "3.weight", "4.weight", "5.weight"]  # 40 exactly
    # By units the same ratio freezes floor(0.8 * 7) = 5 units: the 2 highest train, whatever their size.
    assert ILS(0.8).select(context) == ["0.weight", "1.weight"]


def test_ils_parameter_budget_passes_over_a_unit_that_no_longer_fits():
    # budget floor(0.5 * 65) = 32: u0 (10), u1 would make 40: passed over, u2 makes 30, u3 would make 35
    context = budget_ctx([10, 30, 20, 5], [4, 3, 2, 1])
    assert ILS(0.5, budget="parameters").select(context) == ["0.weight", "2.weight"]


def test_ils_parameter_budget_smaller_than_every_unit_is_an_error():
    with pytest.raises(ValueError, match="less than the smallest unit"):
        ILS(0.99, budget="parameters").select(budget_ctx([16] * 5, [1, 2, 3, 4, 5]))


def test_ils_parameter_budget_trains_every_fitting_unit_over_a_run():
    _, controller = run(chain(7), {"name": "ils", "freeze_ratio": 0.7, "budget": "parameters"}, steps=12, seed=3)
    assert min(controller.stats.trained_steps.values()) >= 1
