"""``master_weights: host``: a bf16 model whose fp32 masters live on host with the paged optimizer
state. Bit-identical to mixed-precision AdamW (tests/mixed_precision_reference.py) on one device,
under DDP (2 processes) and across save/load; a no-op under DeepSpeed's bf16; loud misuse."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

from conftest import WORKERS
from mixed_precision_reference import LR, WEIGHT_DECAY, ReferenceMixedPrecision, compare, lm_batch, straight_and_resumed, tiny_llama, trained_names
from slimfit_accel import SlimFit
from slimfit_accel.errors import ConfigError, IntegrationError
from slimfit_accel.paging import is_paged

CONFIG = {"scheduler": {"name": "ils", "freeze_ratio": 0.5}, "compression": "none", "optimizer_paging": True,
          "master_weights": "host", "memory_meter": "always"}


def start(config=CONFIG, model=None, chunk_bytes=None):
    slimfit = SlimFit.from_config(config)
    model = slimfit.prepare_model(model or tiny_llama())
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=WEIGHT_DECAY)
    slimfit.attach(None, model, optimizer)
    if chunk_bytes is not None:
        slimfit.controller.backend.paging.chunk_bytes = chunk_bytes
    return slimfit, model, optimizer


def train(slimfit, model, optimizer, steps=10, first=0, batch=lm_batch, on_step=None):
    decisions, losses = [], []
    for step in range(first, first + steps):
        with slimfit.step():
            decisions.append(trained_names(model))
            loss = model(**batch(step)).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if on_step is not None:
            on_step()
    return decisions, losses


def reference_run(decisions, first=0):
    reference = ReferenceMixedPrecision(tiny_llama())
    for step, trained in enumerate(decisions, first):
        reference.freeze(trained)
        reference.model(**lm_batch(step)).loss.backward()
        reference.step()
    return reference


@pytest.mark.parametrize("chunk_bytes", [None, 0], ids=["default_chunks", "one_parameter_per_chunk"])
def test_bit_identical_to_mixed_precision_adamw_and_no_master_of_a_frozen_unit_on_the_device(chunk_bytes):
    slimfit, model, optimizer = start(chunk_bytes=chunk_bytes)
    paging = slimfit.controller.backend.paging
    moves: list[int] = []
    paging.listeners.append(moves.append)
    resident_peaks = []

    def after_step():
        resident, peak = 0, 0
        for delta in moves:
            resident += delta
            peak = max(peak, resident)
        assert resident == 0  # masters, fp32 gradients and state all left the device
        resident_peaks.append(peak)
        moves.clear()

    decisions, _ = train(slimfit, model, optimizer, on_step=after_step)
    assert len({frozenset(d) for d in decisions}) > 1 and all(len(d) < len(list(model.parameters())) for d in decisions)
    reference = reference_run(decisions)
    params = list(model.parameters())
    result = compare(params, lambda p: slimfit.master_weights.of(p).host, lambda p: optimizer.state.get(p, {}), reference)
    assert result == {**result, "weights_equal": True, "masters_equal": True, "state_equal": True} and result["state_entries"] > 0
    # between steps: the model is bf16, every state tensor and every master is on host
    assert all(p.dtype == torch.bfloat16 for p in params)
    assert all(is_paged(t) for s in optimizer.state.values() for k, t in s.items() if k != "step")
    assert len(slimfit.master_weights) == len(params)
    if chunk_bytes == 0:
        # one parameter at a time on the device: its master, fp32 gradient and two moments
        largest = max(p.numel() for p in params)
        assert max(resident_peaks) <= 4 * 4 * largest + 4  # + the step count, "resident" on CPU
        assert max(resident_peaks) < 4 * 4 * sum(p.numel() for p in params) / 4


def test_memory_report_bf16_weights_and_host_masters_against_fp32_paging():
    fp32 = start({**CONFIG, "master_weights": None})
    train(*fp32, steps=3)
    mixed = start()
    train(*mixed, steps=3)
    numel = sum(p.numel() for p in mixed[1].parameters())
    m32, m16 = fp32[0].report().memory, mixed[0].report().memory
    assert m32.last.params == 4 * numel and m16.last.params == 2 * numel
    assert m16.last.master_paged == 4 * numel and m32.last.master_paged == 0
    assert m16.last.optimizer_paged == m32.last.optimizer_paged  # fp32 moments either way
    assert m16.last.total < m32.last.total
    text = m16.render()
    assert "fp32 master weights, on host" in text and "parameters (bf16)" in text
    assert "fp32 master" not in m32.render()


def test_default_compression_trains():
    slimfit, model, optimizer = start({**CONFIG, "compression": "slimfit"})
    _, losses = train(slimfit, model, optimizer, steps=12, batch=lambda step: lm_batch(0))
    assert sum(losses[-3:]) < 0.8 * sum(losses[:3])
    assert slimfit.report().memory.last.activations < slimfit.report().memory.last.activations_raw
    moved = [not torch.equal(m.host.to(torch.bfloat16).float(), m.host) for m in slimfit.master_weights]
    assert any(moved)  # masters carry more than bf16 precision



@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (pinned host masters, side-stream prefetch)")
def test_on_cuda_masters_are_pinned_prefetched_and_bit_identical():
    slimfit = SlimFit.from_config(CONFIG)
    model = slimfit.prepare_model(tiny_llama()).cuda()
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=WEIGHT_DECAY)
    slimfit.attach(None, model, optimizer)
    slimfit.controller.backend.paging.chunk_bytes = 0  # many chunks: the next one's copy overlaps the update
    reference = ReferenceMixedPrecision(tiny_llama().cuda())  # its masters and AdamW on the GPU
    for step in range(10):
        batch = {k: v.cuda() for k, v in lm_batch(step).items()}
        with slimfit.step():
            trained = trained_names(model)
            model(**batch).loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        reference.freeze(trained)
        reference.model(**batch).loss.backward()
        reference.step()
    torch.cuda.synchronize()
    result = compare(list(model.parameters()), lambda p: slimfit.master_weights.of(p).host,
                     lambda p: optimizer.state.get(p, {}), reference)
    assert result["weights_equal"] and result["masters_equal"] and result["state_equal"]
    assert all(m.host.is_pinned() and m.host.device.type == "cpu" for m in slimfit.master_weights)
    assert all(p.device.type == "cuda" and p.dtype == torch.bfloat16 for p in model.parameters())


def test_resume_is_bit_identical(tmp_path, fresh_accelerate_state):
    straight, resumed = straight_and_resumed(CONFIG, tmp_path / "ckpt", steps=10)
    inner0, inner1 = straight[2].optimizer, resumed[2].optimizer
    for p0, p1 in zip(straight[1].parameters(), resumed[1].parameters()):
        assert p1.dtype == torch.bfloat16 and torch.equal(p0, p1)
        assert torch.equal(straight[0].master_weights.of(p0).host, resumed[0].master_weights.of(p1).host)
        s0, s1 = inner0.state.get(p0, {}), inner1.state.get(p1, {})
        assert s0.keys() == s1.keys() and all(s1[k].dtype == s0[k].dtype and torch.equal(s0[k], s1[k]) for k in s0)
    assert resumed[0].controller.step == 10


def test_detach_gives_the_parameters_their_fp32_masters_back():
    slimfit, model, optimizer = start()
    train(slimfit, model, optimizer, steps=3)
    masters = [slimfit.master_weights.of(p).host.clone() for p in model.parameters()]
    slimfit.detach()
    assert slimfit.master_weights is None
    for param, master in zip(model.parameters(), masters):
        assert param.dtype == torch.float32 and torch.equal(param, master)
    assert not any(is_paged(t) for s in optimizer.state.values() for t in s.values())


def test_config_needs_paging():
    with pytest.raises(ConfigError, match="master_weights: host .* set optimizer_paging: true"):
        SlimFit.from_config({"master_weights": "host"})


def test_misuse_fails_loudly(tmp_path):
    # a step with a closure cannot be streamed chunk by chunk
    slimfit, model, optimizer = start()
    with slimfit.step():
        model(**lm_batch(0)).loss.backward()
    with pytest.raises(IntegrationError, match="closure"):
        optimizer.step(lambda: torch.tensor(0.0))

    # a parameter trained after prepare_model made it bf16 without a master
    slimfit = SlimFit.from_config(CONFIG)
    model = tiny_llama()
    model.lm_head.weight.requires_grad_(False)
    model = slimfit.prepare_model(model)
    model.lm_head.weight.requires_grad_(True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR)
    slimfit.attach(None, model, optimizer)
    with slimfit.step():
        model(**lm_batch(0)).loss.backward()
        with pytest.raises(IntegrationError, match="no fp32 master weight .* prepare_model"):
            optimizer.step()

    # an optimizer checkpoint saved without masters
    plain = torch.optim.AdamW(tiny_llama().parameters(), lr=LR)
    slimfit, model, optimizer = start()
    with pytest.raises(IntegrationError, match="no master weight for .* saved without master_weights"):
        optimizer.load_state_dict(plain.state_dict())


def test_fp16_accelerator_and_deepspeed_without_bf16_are_refused():
    from accelerate.utils import DistributedType

    slimfit = SlimFit.from_config(CONFIG)
    model = slimfit.prepare_model(tiny_llama())
    fp16 = SimpleNamespace(distributed_type=DistributedType.NO, num_processes=1, mixed_precision="fp16")
    with pytest.raises(IntegrationError, match="mixed_precision='fp16'.*'bf16'"):
        slimfit.attach(fp16, model, torch.optim.AdamW(model.parameters()))

    engine = SimpleNamespace(bfloat16_enabled=lambda: False)
    deepspeed = SimpleNamespace(distributed_type=DistributedType.DEEPSPEED, num_processes=1, mixed_precision="no",
                                deepspeed_engine_wrapped=SimpleNamespace(engine=engine))
    with pytest.warns(UserWarning, match="optimizer_paging has no effect"):
        with pytest.raises(IntegrationError, match="DeepSpeed config does not enable bf16"):
            slimfit.attach(deepspeed, model, torch.optim.AdamW(model.parameters()))


def launch(tmp_path, *flags: str) -> list[dict]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "DS_ACCELERATOR": "cpu"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(WORKERS / "master_weights_worker.py"), "--out", str(tmp_path), *flags]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    prefix = "zero2" if flags else "ddp"
    return [json.loads((tmp_path / f"{prefix}_rank{rank}.json").read_text()) for rank in range(2)]


@pytest.mark.slow
def test_ddp_two_processes_bit_identical_to_mixed_precision_adamw(tmp_path):
    for result in launch(tmp_path):
        assert result["world"] == 2 and result["changing"]
        assert result["weights_equal"] and result["masters_equal"] and result["state_equal"] and result["state_entries"] > 0
        assert result["perturbed_equal"]  # ranks that built different weights train rank 0's masters
        assert result["params_bytes"] == 2 * result["numel"] and result["master_paged"] == 4 * result["numel"]


@pytest.mark.slow
def test_zero2_bf16_keeps_its_own_masters_and_slimfit_holds_none(tmp_path):
    pytest.importorskip("deepspeed")
    for result in launch(tmp_path, "--zero2"):
        assert result["world"] == 2 and result["warned"] == 1
        assert result["weights_bf16"] and result["weights_equal"] and result["masters_equal"] and result["state_equal"]
        assert result["state_present"] > 0
        assert result["slimfit_masters"] is None and result["master_paged"] == 0 and result["optimizer_paged"] == 0
