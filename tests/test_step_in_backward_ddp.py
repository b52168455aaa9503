"""``optimizer_step: in_backward`` under DDP: each unit stepped once the buckets holding its
parameters are averaged (SlimFit's DDP communication hook), bit-identical to the ordinary DDP step
with two real processes (torchrun, gloo), through Accelerate and the Trainer; the DDP setups that
cannot be exact refused with one line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from conftest import WORKERS
from mixed_precision_reference import lm_batch, tiny_llama
from slimfit_accel import SlimFit
from slimfit_accel.errors import IntegrationError

BASE = {"scheduler": {"name": "ils", "freeze_ratio": 0.5}, "compression": "none", "lr_scale": 2.0}


def torchrun(tmp_path: Path, *args: str) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(WORKERS / "in_backward_ddp_worker.py"), "--out", str(tmp_path), *args]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]


@pytest.mark.slow
def test_two_processes_bit_identical_to_the_ordinary_ddp_step(tmp_path):
    torchrun(tmp_path)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    for rank in ranks:
        assert rank["world"] == 2
        assert "2 processes run but the model is not wrapped in DistributedDataParallel" in rank["refused_without_ddp"]
        for name, variant in rank["variants"].items():
            # decisions (which vary), scores, weights, AdamW state, fp32 masters: bit for bit
            assert all(variant["identical"].values()), (name, variant["identical"])
            counts = variant["counts"]
            if name == "unused_here":  # the unit of a layer this process did not use: at optimizer.step()
                assert counts["step"] > 0 and counts["backward"] > 0
            else:  # every unit updated in backward, from DDP's averaged buckets
                assert counts["step"] == 0 and counts["backward"] >= 10
                assert variant["left"][1] == 0  # no gradient of its own left for optimizer.step()
        resident = rank["variants"]["resident"]
        assert resident["buckets"] > 3  # small buckets: units released bucket by bucket
        assert rank["variants"]["paging_blocks"]["spans"] > 1  # a block unit waits for several buckets
        assert rank["variants"]["paging_masters"]["masters"] > 0
        for name in ("resident", "paging_blocks", "paging_masters"):  # the meter's peak of live gradients
            ordinary, in_backward = rank["variants"][name]["peak_grads"]
            assert 0 < in_backward < 0.75 * ordinary, name
    checksums = [{name: v["checksum"] for name, v in rank["variants"].items()} for rank in ranks]
    assert checksums[0] == checksums[1]  # the ranks agree


@pytest.mark.slow
def test_two_process_trainer_in_backward_equals_the_ordinary_step(tmp_path):
    torchrun(tmp_path, "--trainer")
    ranks = [json.loads((tmp_path / f"trainer_rank{r}.json").read_text()) for r in range(2)]
    for rank in ranks:
        assert rank["world"] == 2 and rank["weights"]
        assert rank["counts"]["backward"] > 0 and rank["counts"]["step"] == 0
        ordinary, in_backward = rank["norms"]  # the logged grad_norm, of the averaged gradients
        assert len(ordinary) == 4 and in_backward == pytest.approx(ordinary, rel=1e-5)
    assert ranks[0]["checksum"] == ranks[1]["checksum"]


# ------------------------------------------------------------------ one process (fast)
@pytest.fixture
def process_group(monkeypatch):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(port))
    dist.init_process_group("gloo", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def ddp_run(optimizer_step: str, steps: int = 4, config: dict | None = None):
    slimfit = SlimFit.from_config({**BASE, "optimizer_paging": True, **(config or {}), "optimizer_step": optimizer_step})
    ddp = DDP(slimfit.prepare_model(tiny_llama()), find_unused_parameters=True, bucket_cap_mb=0.01)
    opt = torch.optim.AdamW(ddp.parameters(), lr=1e-2, weight_decay=0.1)
    slimfit.attach(None, ddp, opt)
    for step in range(steps):
        with slimfit.step():
            ddp(**lm_batch(step)).loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
    return slimfit, ddp, opt


def test_one_process_ddp_equals_the_ordinary_step_and_detach_leaves_plain_ddp(process_group):
    runs = {}
    for mode in ("after_backward", "in_backward"):
        slimfit, ddp, opt = ddp_run(mode)
        counts = dict(getattr(slimfit.controller.backend, "counts", {}))
        scores = slimfit.controller.scores.clone()
        slimfit.detach()
        ddp(**lm_batch(9)).loss.backward()  # detached: DDP's reduced gradients in .grad as ever
        assert all(p.grad is not None for p in ddp.parameters())
        opt.step()
        runs[mode] = (scores, [p.detach().clone() for p in ddp.parameters()], counts, ddp)
    (scores, weights, _, _), (scores_ib, weights_ib, counts, ddp) = runs["after_backward"], runs["in_backward"]
    assert torch.equal(scores, scores_ib) and all(torch.equal(a, b) for a, b in zip(weights, weights_ib))
    assert counts["backward"] > 0 and counts["step"] == 0
    # attached again to the same DDP (which takes one communication hook for good): SlimFit's is reused
    slimfit = SlimFit.from_config({**BASE, "optimizer_step": "in_backward"})
    slimfit.prepare_model(ddp.module)
    slimfit.attach(None, ddp, torch.optim.AdamW(ddp.parameters()))
    with slimfit.step():
        ddp(**lm_batch(0)).loss.backward()
        assert slimfit.controller.backend.counts["backward"] > 0
    slimfit.detach()


def test_no_sync_and_join_are_refused_at_backward(process_group):
    slimfit, ddp, opt = ddp_run("in_backward", steps=1)
    with slimfit.step(), ddp.no_sync():
        with pytest.raises(IntegrationError, match="backward ran under DDP without reducing any bucket .*no_sync"):
            ddp(**lm_batch(1)).loss.backward()
    opt.zero_grad(set_to_none=True)
    with slimfit.step(), ddp.join():
        with pytest.raises(IntegrationError, match="DDP's join\\(\\) averages over the processes not yet joined"):
            ddp(**lm_batch(2)).loss.backward()


def test_a_communication_hook_and_ddp_settings_that_change_reduction_are_refused(process_group):
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

    def attach(**ddp_kwargs):
        slimfit = SlimFit.from_config({**BASE, "optimizer_step": "in_backward"})
        ddp = DDP(slimfit.prepare_model(tiny_llama()), find_unused_parameters=True, **ddp_kwargs)
        if not ddp_kwargs:
            ddp.register_comm_hook(None, allreduce_hook)
        slimfit.attach(None, ddp, torch.optim.AdamW(ddp.parameters()))

    with pytest.raises(IntegrationError, match=r"DDP already has a communication hook \(allreduce_hook\)"):
        attach()
    with pytest.raises(IntegrationError, match="DDP was built with static_graph=True"):
        attach(static_graph=True)
    with pytest.raises(IntegrationError, match="DDP was built with skip_all_reduce_unused_params=True"):
        attach(skip_all_reduce_unused_params=True)


def test_fsdp2_is_refused(process_group):
    from torch.distributed.fsdp import fully_shard

    slimfit = SlimFit.from_config({**BASE, "optimizer_step": "in_backward"})
    model = slimfit.prepare_model(tiny_llama())
    fully_shard(model)  # one process on CPU: a real FSDP2 model
    with pytest.raises(IntegrationError, match="in_backward is not supported here: FSDP2 reduces and shards gradients"):
        slimfit.attach(None, model, torch.optim.AdamW(model.parameters()))
