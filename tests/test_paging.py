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
from slimfit_accel.master_weights import MasterWeights
from slimfit_accel.paging import OptimizerPaging, is_paged, paged_bytes


def state_bytes(opt: torch.optim.Optimizer) -> int:
    return sum(t.numel() * t.element_size() for state in opt.state.values() for t in state.values() if isinstance(t, torch.Tensor))


def train(paging: bool, optimizer: str = "adamw", steps: int = 10):
    slimfit = SlimFit.from_config({"scheduler": {"name": "ils", "freeze_ratio": 0.8}, "optimizer_paging": paging, "memory_meter": "always"})
    model = slimfit.prepare_model(tiny_bert(layers=3))
    if optimizer == "adamw":
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    else:
        opt = torch.optim.SGD(model.parameters(), lr=1e-2, momentum=0.9, weight_decay=0.1)
    slimfit.attach(None, model, opt)
    paged, resident_in_backward = [], []
    for step in range(steps):
        with slimfit.step():
            model(**random_batch(seed=step)).loss.backward()
            resident_in_backward.append(state_bytes(opt) - paged_bytes(opt))
            opt.step()
            opt.zero_grad(set_to_none=True)
        paged.append(paged_bytes(opt))
    if paging:  # forward and backward ran with no optimizer state on the device
        assert resident_in_backward == [0] * steps
    report = slimfit.report()
    return model, opt, slimfit, paged, report


@pytest.mark.parametrize("optimizer", ["adamw", "sgd"])
def test_paging_is_bit_identical_and_keeps_frozen_state_off_the_device(optimizer):
    model0, opt0, slim0, _, report0 = train(False, optimizer)
    model1, opt1, slim1, paged, report1 = train(True, optimizer)
    assert all(b > 0 for b in paged)  # after every step all state is on host
    # the meter: after the step the paged state is all the resident run holds; on the device
    # only the trained units' state, and only during the step
    mem0, mem1 = report0.memory.last, report1.memory.last
    assert mem1.optimizer_paged == paged[-1] == mem0.optimizer and mem0.optimizer_paged == 0
    assert 0 < mem1.optimizer < mem0.optimizer and mem1.total < mem0.total
    assert "paged to host" in report1.memory.render()
    for a, b in zip(model0.parameters(), model1.parameters()):
        assert torch.equal(a, b)
    slim1.detach()  # every tensor back where the optimizer keeps it
    assert paged_bytes(opt1) == 0
    for p0, p1 in zip(model0.parameters(), model1.parameters()):
        s0, s1 = opt0.state[p0], opt1.state[p1]
        assert s0.keys() == s1.keys() and all(torch.equal(s0[k], s1[k]) for k in s0)
    slim0.detach()


def _three_params(seed: int = 0) -> list[torch.nn.Parameter]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(shape, generator=generator)) for shape in ((64, 32), (8,), (16, 16))]


def _set_grads(params, step: int) -> None:
    generator = torch.Generator().manual_seed(100 + step)
    for param in params:
        param.grad = torch.randn(param.shape, generator=generator)


@pytest.mark.parametrize("make", [
    lambda ps: torch.optim.AdamW([{"params": ps[:2]}, {"params": ps[2:], "lr": 0.05}], lr=0.1, weight_decay=0.1),
    lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, weight_decay=0.1),
], ids=["adamw_two_groups", "sgd_momentum"])
def test_streamed_step_is_bit_identical_one_chunk_at_a_time_smallest_first(make):
    plain, streamed = _three_params(), _three_params()
    opt0, opt1 = make(plain), make(streamed)
    # 32 and 1024 bytes of parameters: a chunk each; the 8 KiB matrix: 8 slices of 8 rows
    paging = OptimizerPaging(opt1, chunk_bytes=1024).install()
    moves: list[int] = []
    paging.listeners.append(moves.append)
    sizes = []
    for step in range(5):
        _set_grads(plain, step)
        _set_grads(streamed, step)
        if step == 3:  # a parameter without a gradient is skipped, as the optimizer skips it
            plain[0].grad = streamed[0].grad = None
        opt0.step()
        moves.clear()
        opt1.step()
        assert all(p.grad is None for p in streamed)  # released as each chunk is stepped
        assert paged_bytes(opt1) == sum(t.numel() * t.element_size() for s in opt1.state.values() for t in s.values())
        resident, peak = 0, 0
        for delta in moves:
            resident += delta
            peak = max(peak, resident)
        assert resident == 0
        sizes.append(peak)
    for a, b in zip(plain, streamed):
        assert torch.equal(a, b)
        assert all(torch.equal(opt0.state[a][k], opt1.state[b][k].to(opt0.state[a][k].device)) for k in opt0.state[a])
    # at most one chunk's state on the "device" at a time (two moments of 1024 bytes + a step count)
    assert 0 < min(sizes) and max(sizes) <= 2 * 1024 + 8
    assert paging.chunks_stepped == 2 * 5 and paging.slices_stepped == 8 * 4  # the matrix had no gradient once


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (side-stream prefetch, pinned host copies)")
def test_streamed_step_on_cuda_prefetches_and_stays_bit_identical():
    plain = [p.detach().cuda().requires_grad_() for p in _three_params()]
    streamed = [p.detach().cuda().requires_grad_() for p in _three_params()]
    opt0 = torch.optim.AdamW(plain, lr=0.1, weight_decay=0.1)
    opt1 = torch.optim.AdamW(streamed, lr=0.1, weight_decay=0.1)
    paging = OptimizerPaging(opt1, chunk_bytes=1024).install()  # two chunks (one prefetched) and a sliced matrix
    for step in range(5):
        for params, opt in ((plain, opt0), (streamed, opt1)):
            generator = torch.Generator().manual_seed(100 + step)
            for param in params:
                param.grad = torch.randn(param.shape, generator=generator).cuda()
            opt.step()
    torch.cuda.synchronize()
    assert all(torch.equal(a, b) for a, b in zip(plain, streamed))
    state = opt1.state[streamed[0]]["exp_avg"]
    assert is_paged(state) and state.device.type == "cpu" and state.is_pinned()
    assert torch.equal(state.cuda(), opt0.state[plain[0]]["exp_avg"])
    assert paging.chunks_stepped == 2 * 5 and paging.slices_stepped == 8 * 5


def _two_layers(masters: bool):
    torch.manual_seed(0)
    # weights of 16 KiB (256 x 16) and 8 KiB (8 x 256): larger than the 2 KiB chunks below
    model = torch.nn.Sequential(torch.nn.Linear(16, 256), torch.nn.Linear(256, 8))
    return model, (MasterWeights.cast_model(model, pin=False) if masters else None)


@pytest.mark.parametrize("masters", [False, True], ids=["fp32", "master_weights_host"])
def test_a_parameter_larger_than_a_chunk_is_stepped_in_row_slices_bit_identical_to_whole(masters):
    chunk_bytes = 2048
    runs = []
    for chunk in (2**30, chunk_bytes):  # every parameter whole in one chunk; then sliced
        model, master_weights = _two_layers(masters)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
        paging = OptimizerPaging(opt, chunk_bytes=chunk, masters=master_weights).install()
        resident, peak = [0], [0]

        def follow(delta: int, resident=resident, peak=peak) -> None:
            resident[0] += delta
            peak[0] = max(peak[0], resident[0])

        paging.listeners.append(follow)
        dtype = torch.bfloat16 if masters else torch.float32
        for step in range(4):
            x = torch.randn(32, 16, generator=torch.Generator().manual_seed(step)).to(dtype)
            model(x).float().pow(2).mean().backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            assert resident[0] == 0
        runs.append((model, opt, master_weights, paging, peak[0]))
    (whole, opt0, m0, paging0, peak0), (sliced, opt1, m1, paging1, peak1) = runs
    assert paging0.slices_stepped == 0 and paging1.slices_stepped == 4 * (8 + 4)  # 32 rows, then 2 rows, a slice
    for a, b in zip(whole.parameters(), sliced.parameters()):
        assert torch.equal(a, b)
        s0, s1 = opt0.state[a], opt1.state[b]
        assert s0.keys() == s1.keys() and all(torch.equal(s0[k], s1[k]) for k in s0)
        assert is_paged(s1["exp_avg"]) and is_paged(s1["step"])  # all of it in host memory between steps
        if masters:
            assert torch.equal(m0.of(a).host, m1.of(b).host)
    # one slice on the device at a time: its two moments (with masters also its fp32 master rows
    # and gradient), + a step count; stepped whole, the 256 x 16 matrix's state alone is 32 KiB
    assert 0 < peak1 <= (4 if masters else 2) * chunk_bytes + 64 < 32 * 1024 < peak0


def test_a_non_element_wise_optimizer_steps_every_parameter_whole():
    params = _three_params()
    paging = OptimizerPaging(torch.optim.Adagrad(params), chunk_bytes=0).install()
    _set_grads(params, 0)
    paging.optimizer.step()
    assert not paging.steps_by_rows() and paging.slices_stepped == 0 and paging.chunks_stepped == 3


def test_step_with_a_closure_is_not_streamed_but_still_exact():
    plain, streamed = _three_params(), _three_params()
    opt0 = torch.optim.SGD(plain, lr=0.1, momentum=0.9)
    opt1 = torch.optim.SGD(streamed, lr=0.1, momentum=0.9)
    paging = OptimizerPaging(opt1, chunk_bytes=0).install()
    for step in range(3):
        for params, opt in ((plain, opt0), (streamed, opt1)):
            def closure(params=params):
                _set_grads(params, step)
                return torch.tensor(0.0)
            opt.step(closure)
    assert paging.chunks_stepped == 0 and paged_bytes(opt1) > 0
    assert all(torch.equal(a, b) for a, b in zip(plain, streamed))
    paging.remove()
    assert paged_bytes(opt1) == 0 and not is_paged(opt1.state[streamed[0]]["momentum_buffer"])


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
