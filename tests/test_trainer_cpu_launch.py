"""The no-GPU torchrun pitfall: a helper that sets the Accelerator up, and a clear error otherwise."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from accelerate.utils import DistributedType

from slimfit_accel import IntegrationError, SlimFit, make_accelerator

from conftest import tiny_bert


def test_make_accelerator_tolerates_frozen_units_and_runs_on_cpu():
    accelerator = make_accelerator(gradient_accumulation_steps=2)
    assert accelerator.gradient_accumulation_steps == 2
    assert accelerator.ddp_handler.find_unused_parameters
    if not torch.cuda.is_available():
        assert accelerator.device.type == "cpu"


def test_attach_refuses_launched_processes_that_each_run_alone(monkeypatch):
    slimfit = SlimFit.from_config({})
    model = slimfit.prepare_model(tiny_bert())
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    monkeypatch.setenv("WORLD_SIZE", "2")
    alone = SimpleNamespace(distributed_type=DistributedType.NO, num_processes=1)
    with pytest.raises(IntegrationError, match=r"2 processes were launched .*DistributedType.NO.*make_accelerator"):
        slimfit.attach(alone, model, optimizer)
