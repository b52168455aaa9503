"""The Trainer callback's DDP check, for the model and arguments as transformers 4.x and 5.x shape them.

Both versions mark checkpointed modules alike (``module.gradient_checkpointing = True`` and
``module._gradient_checkpointing_func = functools.partial(checkpoint, **kwargs)``, from
``PreTrainedModel._set_gradient_checkpointing``), but name the rest differently: 4.x has
``model.is_gradient_checkpointing`` and ``TrainingArguments.gradient_checkpointing(_kwargs)``,
5.x ``is_activation_checkpointing`` and ``activation_checkpointing(_kwargs)``. Either way the
Trainer gives DDP ``find_unused_parameters = not checkpointing`` unless told otherwise, which
SlimFit's frozen units cannot train under.
"""

from __future__ import annotations

import functools
from types import SimpleNamespace

import pytest
import torch.utils.checkpoint

from conftest import tiny_bert
from slimfit_accel import IntegrationError
from slimfit_accel.integrations.trainer import _check_ddp


@pytest.fixture(autouse=True)
def two_processes(monkeypatch):
    import accelerate.state
    from accelerate.utils import DistributedType

    two = SimpleNamespace(num_processes=2, distributed_type=DistributedType.MULTI_CPU)
    monkeypatch.setattr(accelerate.state, "PartialState", lambda: two)


def transformers4_bert(**checkpoint_kwargs):
    """tiny_bert as transformers 4.46 leaves it after ``gradient_checkpointing_enable(kwargs)``:
    the module flags 4.x's ``_set_gradient_checkpointing`` sets, and no ``is_activation_checkpointing``."""
    model = tiny_bert()

    class Bert4(type(model)):
        @property
        def is_activation_checkpointing(self):  # not in 4.x
            raise AttributeError("is_activation_checkpointing")

        @property
        def is_gradient_checkpointing(self):  # 4.46's body
            return any(hasattr(m, "gradient_checkpointing") and m.gradient_checkpointing for m in self.modules())

    model.__class__ = Bert4
    function = functools.partial(torch.utils.checkpoint.checkpoint, **checkpoint_kwargs)
    for module in model.modules():
        if hasattr(module, "gradient_checkpointing"):
            module._gradient_checkpointing_func = function
            module.gradient_checkpointing = True
    assert model.is_gradient_checkpointing
    return model


def transformers5_bert(**checkpoint_kwargs):
    model = tiny_bert()
    model.activation_checkpointing_enable(activation_checkpointing_kwargs=checkpoint_kwargs)
    return model


def args4(**overrides):
    """The TrainingArguments fields 4.x has (no activation_checkpointing*)."""
    fields = dict(ddp_find_unused_parameters=None, gradient_checkpointing=True, gradient_checkpointing_kwargs=None)
    return SimpleNamespace(**{**fields, **overrides})


def args5(**overrides):
    fields = dict(ddp_find_unused_parameters=None, activation_checkpointing=True, activation_checkpointing_kwargs=None,
                  gradient_checkpointing=None, gradient_checkpointing_kwargs=None)
    return SimpleNamespace(**{**fields, **overrides})


@pytest.mark.parametrize("model, args", [(transformers4_bert, args4), (transformers5_bert, args5)], ids=["4.x", "5.x"])
def test_checkpointing_without_find_unused_parameters_is_refused(model, args):
    with pytest.raises(IntegrationError, match="ddp_find_unused_parameters=True"):
        _check_ddp(args(), model(use_reentrant=False))
    _check_ddp(args(ddp_find_unused_parameters=True), model(use_reentrant=False))


@pytest.mark.parametrize(
    "model, args, field",
    [(transformers4_bert, args4, "gradient_checkpointing_kwargs"), (transformers5_bert, args5, "activation_checkpointing_kwargs")],
    ids=["4.x", "5.x"],
)
def test_reentrant_checkpointing_is_refused_naming_this_versions_argument(model, args, field):
    with pytest.raises(IntegrationError, match=f"use_reentrant=True .* TrainingArguments\\({field}="):
        _check_ddp(args(ddp_find_unused_parameters=True), model(use_reentrant=True))
    with pytest.raises(IntegrationError, match="use_reentrant=True"):
        _check_ddp(args(ddp_find_unused_parameters=True), model())  # torch's default is reentrant


def test_no_checkpointing_passes():
    _check_ddp(args4(gradient_checkpointing=False), tiny_bert())
    _check_ddp(args5(activation_checkpointing=False), tiny_bert())


def test_a_model_the_trainer_does_not_know_gets_find_unused_parameters():
    # The Trainer sets find_unused_parameters=True for any model that is not a PreTrainedModel
    # (a PEFT model, say), checkpointing or not.
    wrapper = torch.nn.Sequential(transformers5_bert(use_reentrant=False))
    _check_ddp(args5(), wrapper)
