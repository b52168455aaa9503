"""Units the scheduler can never pick (ILS ``budget: parameters``: larger than the step budget)
are said plainly: once at attach, apart from the candidates in ``summary()``, and in the report."""

from __future__ import annotations

import warnings

import pytest
import torch

from conftest import random_batch
from slimfit_accel import PluginError, SlimFit
from slimfit_accel.hookspecs import hookimpl

EMBEDDINGS = "bert.embeddings.word_embeddings.weight"
BUDGETED = {"scheduler": {"name": "ils", "freeze_ratio": 0.8, "budget": "parameters"}, "compression": "none"}


def minilm_like_bert(vocab: int):
    """A tiny BERT whose word embeddings are most of its parameters when ``vocab`` is large (as MiniLM's, 52%)."""
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    config = BertConfig(vocab_size=vocab, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=32, num_labels=2)
    return BertForSequenceClassification(config)


def train(slimfit: SlimFit, model, steps: int = 2) -> list[str]:
    """attach and train ``steps`` steps; the warnings attach gave."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        slimfit.attach(None, model, optimizer)
    for step in range(steps):
        with slimfit.step():
            model(**random_batch(seed=step)).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return [str(w.message) for w in caught]


def test_a_unit_larger_than_the_step_budget_is_named_at_start_in_the_summary_and_the_report():
    model = minilm_like_bert(vocab=2000)
    slimfit = SlimFit.from_config(BUDGETED)
    slimfit.prepare_model(model)
    embeddings = model.bert.embeddings.word_embeddings.weight
    loaded = embeddings.detach().clone()
    total = sum(p.numel() for p in model.parameters())
    assert embeddings.numel() / total > 0.5

    summary = slimfit.summary()
    schedulable = sum(u.numel for u in slimfit.units.schedulable)
    assert summary.never_trained == embeddings.numel() == 64_000
    assert summary.candidates == schedulable - 64_000
    assert summary.always_trained + summary.candidates + summary.never_trained == summary.trainable
    assert f"SlimFit candidates: {summary.candidates:,d} " in str(summary)
    assert "never trained (the scheduler cannot pick them): 64,000 (" in str(summary)

    said = [m for m in train(slimfit, model) if "can never train" in m]
    assert len(said) == 1
    budget = slimfit.scheduler.strategy.step_budget([u.numel for u in slimfit.units.schedulable])
    assert said[0].startswith(
        f"SlimFit: scheduler 'ils' can never train 1 unit(s) holding 64,000 parameters ({100 * 64_000 / total:.1f}% of the "
        f"model), which keep their loaded weights for the whole run: {EMBEDDINGS} (64,000 parameters, more than the "
        f"step budget of {budget:,d} (1 - freeze_ratio 0.8))."
    )
    assert "units.always_train" in said[0] and "freeze_ratio" in said[0]
    assert torch.equal(embeddings.detach(), loaded)  # what was said is what happened

    report = slimfit.report()
    assert list(report.never_trainable) == [EMBEDDINGS] and report.never_trainable_params == 64_000
    assert report.to_dict()["never_trainable"] == report.never_trainable
    assert report.trained_steps[EMBEDDINGS] == 0
    rendered = report.render()
    assert "units the scheduler can never pick" in rendered
    assert f"never trained (the scheduler cannot pick it): {EMBEDDINGS}: 64,000 parameters" in rendered


def test_nothing_is_said_when_every_unit_fits_the_budget():
    model = minilm_like_bert(vocab=99)
    slimfit = SlimFit.from_config(BUDGETED)
    slimfit.prepare_model(model)
    summary = slimfit.summary()
    assert summary.never_trained == 0 and "never trained" not in str(summary)
    assert summary.candidates == sum(u.numel for u in slimfit.units.schedulable)
    assert not [m for m in train(slimfit, model) if "never train" in m]
    report = slimfit.report()
    assert report.never_trainable == {} and "never pick" not in report.render()


def test_units_budget_never_excludes_a_unit():
    slimfit = SlimFit.from_config({"scheduler": {"name": "ils", "freeze_ratio": 0.8}, "compression": "none"})
    slimfit.prepare_model(minilm_like_bert(vocab=2000))
    assert slimfit.summary().never_trained == 0


class BadNeverTrained:
    __name__ = "bad_never_trained"

    @hookimpl
    def register_schedulers(self, register):
        class Scheduler:
            def select(self, ctx):
                return [u.name for u in ctx.units]

            def never_trained(self, units):
                return {"no.such.unit": "because"}

        register("bad_never", Scheduler)


def test_a_never_trained_answer_naming_unknown_units_names_the_plugin():
    slimfit = SlimFit.from_config({"scheduler": {"name": "bad_never"}}, plugins=[BadNeverTrained()])
    slimfit.prepare_model(minilm_like_bert(vocab=99))
    with pytest.raises(PluginError, match=r"plugin 'bad_never_trained': scheduler 'bad_never' never_trained returned unknown unit names: \['no.such.unit'\]"):
        slimfit.summary()
