"""Optimizer paging: frozen units' state in host memory, bit-identical training, meter figures."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

from conftest import WORKERS, random_batch, tiny_bert
from slimfit_accel import SlimFit
from slimfit_accel.errors import IntegrationError
from slimfit_accel.paging import OptimizerPaging, is_paged, paged_bytes


def train(paging: bool, optimizer: str = "adamw", steps: int = 10):
    slimfit = SlimFit.from_config({"scheduler": {"name": "ils", "freeze_ratio": 0.8}, "optimizer_paging": paging})
    model = slimfit.prepare_model(tiny_bert(layers=3))
    if optimizer == "adamw":
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    else:
        opt = torch.optim.SGD(model.parameters(), lr=1e-2, momentum=0.9, weight_decay=0.1)
    slimfit.attach(None, model, opt)
    paged = []
    for step in range(steps):
        with slimfit.step():
            model(**random_batch(seed=step)).loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        paged.append(paged_bytes(opt))
    report = slimfit.report()
    return model, opt, slimfit, paged, report


@pytest.mark.parametrize("optimizer", ["adamw", "sgd"])
def test_paging_is_bit_identical_and_keeps_frozen_state_off_the_device(optimizer):
    model0, opt0, slim0, _, report0 = train(False, optimizer)
    model1, opt1, slim1, paged, report1 = train(True, optimizer)
    assert all(b > 0 for b in paged[1:])  # from the second step on, frozen units' state is paged
    # the meter: resident and paged state apart, together what the resident run holds
    mem0, mem1 = report0.memory.last, report1.memory.last
    assert mem1.optimizer_paged == paged[-1] and mem0.optimizer_paged == 0
    assert mem1.optimizer + mem1.optimizer_paged == mem0.optimizer
    assert mem1.optimizer < mem0.optimizer and mem1.total < mem0.total
    assert "paged to host" in report1.memory.render()
    for a, b in zip(model0.parameters(), model1.parameters()):
        assert torch.equal(a, b)
    slim1.detach()  # every tensor back where the optimizer keeps it
    assert paged_bytes(opt1) == 0
    for p0, p1 in zip(model0.parameters(), model1.parameters()):
        s0, s1 = opt0.state[p0], opt1.state[p1]
        assert s0.keys() == s1.keys() and all(torch.equal(s0[k], s1[k]) for k in s0)
    slim0.detach()


def test_paged_state_is_tagged_and_comes_back_on_plan():
    param = torch.nn.Parameter(torch.randn(4, 4))
    opt = torch.optim.AdamW([param], lr=0.1)
    param.grad = torch.ones_like(param)
    opt.step()
    moments = opt.state[param]["exp_avg"].clone()
    paging = OptimizerPaging(opt)
    paging.plan([param])
    assert is_paged(opt.state[param]["exp_avg"]) and paging.paged_out == 3  # two moments + step
    paging.plan([])
    paging.ready()
    assert not is_paged(opt.state[param]["exp_avg"]) and torch.equal(opt.state[param]["exp_avg"], moments)


def test_paging_under_deepspeed_is_a_no_op_with_a_warning():
    from accelerate.utils import DistributedType

    slimfit = SlimFit.from_config({"optimizer_paging": True})
    model = slimfit.prepare_model(tiny_bert())
    engine = SimpleNamespace(optimizer=None, zero_optimization_stage=lambda: 0)  # not ZeRO: the ZeRO backend says so next
    accelerator = SimpleNamespace(distributed_type=DistributedType.DEEPSPEED, num_processes=1,
                                  deepspeed_engine_wrapped=SimpleNamespace(engine=engine))
    with pytest.warns(UserWarning, match="optimizer_paging has no effect under DeepSpeed ZeRO.*offload_optimizer"):
        with pytest.raises(IntegrationError, match="ZeroStepBackend needs a DeepSpeed engine"):
            slimfit.attach(accelerator, model, torch.optim.AdamW(model.parameters()))


@pytest.mark.slow
def test_ddp_two_processes_paging_is_bit_identical_and_composes_with_checkpointing(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(WORKERS / "paging_worker.py"), "--out", str(tmp_path)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    for rank in range(2):
        result = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert result["world"] == 2
        assert result["weights_equal"] and result["state_equal"]
        assert all(b > 0 for b in result["paged_bytes"][1:])
        assert result["reported_paged"] > 0 and result["resident_optimizer"][1] < result["resident_optimizer"][0]
        assert result["checkpointed_max_diff"] < 1e-5  # paging + block checkpointing under DDP


@pytest.mark.slow
def test_zero2_two_processes_paging_changes_nothing_and_pages_nothing(tmp_path):
    # Under ZeRO the optimizer state is DeepSpeed's flat partitions (on host with
    # offload_optimizer): paging steps aside with a warning, so results are bit-identical and no
    # state is counted twice.
    pytest.importorskip("deepspeed")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "DS_ACCELERATOR": "cpu"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(WORKERS / "paging_worker.py"), "--out", str(tmp_path), "--zero2"]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    for rank in range(2):
        result = json.loads((tmp_path / f"zero2_rank{rank}.json").read_text())
        assert result["world"] == 2 and result["warned"]
        assert result["weights_equal"] and result["state_equal"] and result["state_present"] > 0
        assert result["reported_paged"] == 0
