"""``frozen_weights: int8``: schedulable 2-D weights held on the device as int8 codes + fp32 row
scales, exact masters on host, a trained unit materialised for its step. Bit-identical to a model
whose frozen weights are their dequantised int8 rounding (tests/frozen_int8_reference.py), alone
and with master weights, a tied embedding and the chunked loss; frozen masters never move; the
meter counts codes and scales; state dicts and checkpoints round-trip; DDP ranks agree; DeepSpeed
and FSDP are refused."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

from conftest import WORKERS
from frozen_int8_reference import ReferenceInt8, int8_rounding
from mixed_precision_reference import LR, WEIGHT_DECAY, lm_batch, straight_and_resumed, tiny_llama, trained_names
from slimfit_accel import SlimFit
from slimfit_accel.errors import IntegrationError
from slimfit_accel.frozen_int8 import stored_weight

CONFIG = {"scheduler": {"name": "ils", "freeze_ratio": 0.5}, "compression": "none", "optimizer_paging": True,
          "memory_meter": "always", "frozen_weights": "int8"}
MIXED = {**CONFIG, "master_weights": "host"}


def tied_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                         intermediate_size=64, max_position_embeddings=64, tie_word_embeddings=True)
    return LlamaForCausalLM(config)


def start(config=CONFIG, build=tiny_llama):
    slimfit = SlimFit.from_config(config)
    model = slimfit.prepare_model(build())
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=WEIGHT_DECAY)
    slimfit.attach(None, model, optimizer)
    return slimfit, model, optimizer


def stored_names(slimfit, model) -> set[str]:
    return {name for name, p in model.named_parameters() if stored_weight(p) is not None}


def exact(slimfit, param) -> torch.Tensor:
    """The exact value of ``param``: its master (int8 store's, or fp32 of master_weights), else itself."""
    stored = stored_weight(param)
    master = slimfit.master_weights.of(param) if slimfit.master_weights is not None else None
    return stored.exact if stored is not None else master.host if master is not None else param.detach()


def train(slimfit, model, optimizer, steps=8, first=0, on_step=None):
    decisions = []
    for step in range(first, first + steps):
        with slimfit.step():
            decisions.append(trained_names(model))
            model(**lm_batch(step)).loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        if on_step is not None:
            on_step(decisions[-1])
    return decisions


@pytest.mark.parametrize("config,build,chunked", [
    (CONFIG, tiny_llama, False), (MIXED, tiny_llama, False), (MIXED, tied_llama, True),
    ({**MIXED, "optimizer_step": "in_backward"}, tiny_llama, False),
], ids=["fp32", "master_weights_host", "tied_embedding_chunked_loss", "optimizer_step_in_backward"])
def test_bit_identical_to_dequantized_frozen_weights_and_frozen_masters_never_move(config, build, chunked):
    config = {**config, "chunked_loss": True} if chunked else config
    slimfit, model, optimizer = start(config, build)
    names = dict(model.named_parameters())
    stored = stored_names(slimfit, model)
    assert stored == {n for n, p in names.items() if p.dim() == 2}  # every schedulable matrix, the tied one once

    before = {n: exact(slimfit, p).clone() for n, p in names.items()}

    def frozen_unchanged(trained):
        for name in stored - trained:
            assert torch.equal(exact(slimfit, names[name]), before[name]), name
        before.update({n: exact(slimfit, p).clone() for n, p in names.items()})

    decisions = train(slimfit, model, optimizer, on_step=frozen_unchanged)
    assert len({frozenset(d) for d in decisions}) > 1 and all(stored - d for d in decisions)
    if chunked:  # the tied embedding / head both trained and frozen (the loss dequantises the frozen head)
        tied = ["model.embed_tokens.weight" in d for d in decisions]
        assert any(tied) and not all(tied)

    ref_model = build()
    if chunked:
        from slimfit_accel.chunked_loss import enable_chunked_loss

        enable_chunked_loss(ref_model)
    reference = ReferenceInt8(ref_model, stored, mixed="master_weights" in config)
    for step, trained in enumerate(decisions):
        reference.prepare(trained)
        reference.model(**lm_batch(step)).loss.backward()
        reference.step()
    ref_params = dict(zip(reference.names, reference.params()))
    for name, param in names.items():
        assert torch.equal(exact(slimfit, param), reference.master(name)), name
        if name in stored:  # codes and scales: the int8 rounding of the master
            codes, scales = int8_rounding(reference.master(name))
            assert torch.equal(stored_weight(param).codes, codes) and torch.equal(stored_weight(param).scales, scales)
        mine, theirs = optimizer.state.get(param, {}), reference.optimizer.state.get(
            reference.mixed.masters[reference.names.index(name)] if reference.mixed else ref_params[name], {})
        assert mine.keys() == theirs.keys() and all(torch.equal(mine[k].cpu(), theirs[k]) for k in theirs), name
    # between steps: stored weights are NaN placeholders (a direct read is loud), no full copy on the device
    for name in stored:
        assert not stored_weight(names[name]).materialised and torch.isnan(names[name]).all()


def test_the_meter_counts_codes_scales_and_the_trained_copies_exactly():
    slimfit, model, optimizer = start(MIXED)
    trained_params = []
    train(slimfit, model, optimizer, steps=3, on_step=lambda t: trained_params.append(t))
    names = dict(model.named_parameters())
    stored = stored_names(slimfit, model)
    codes = sum(p.numel() + p.shape[0] * 4 for n, p in names.items() if n in stored)
    materialised = sum(names[n].numel() * 2 for n in trained_params[-1] if n in stored)
    others = sum(p.numel() * 2 for n, p in names.items() if n not in stored)
    placeholder = 2  # one bf16 NaN element all placeholders expand
    assert slimfit.report().memory.last.params == codes + materialised + others + placeholder
    full = start(MIXED | {"frozen_weights": "full"})
    train(*full, steps=1)
    assert full[0].report().memory.last.params == sum(p.numel() * 2 for p in full[1].parameters())
    assert codes + others < 0.6 * full[0].report().memory.last.params  # with nothing trained: about half of bf16


def test_default_compression_trains_and_detach_restores_full_precision():
    slimfit, model, optimizer = start({**MIXED, "compression": "slimfit"})
    losses = []
    for step in range(12):
        with slimfit.step():
            loss = model(**lm_batch(0)).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    assert sum(losses[-3:]) < 0.8 * sum(losses[:3])
    masters = {n: slimfit.master_weights.of(p).host.clone() for n, p in model.named_parameters()}
    slimfit.detach()
    for name, param in model.named_parameters():
        assert param.dtype == torch.float32 and torch.equal(param, masters[name])
        assert stored_weight(param) is None
    assert "forward" not in model.model.layers[0].self_attn.q_proj.__dict__


@pytest.mark.parametrize("config", [CONFIG, MIXED], ids=["fp32", "master_weights_host"])
def test_state_dict_gives_the_exact_weights_and_loads_back_into_the_masters(config):
    slimfit, model, optimizer = start(config)
    train(slimfit, model, optimizer, steps=3)
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    names = dict(model.named_parameters())
    for name, param in names.items():
        assert torch.equal(saved[name], exact(slimfit, param).to(param.dtype)), name
    other, model2, _ = start(config)
    loaded = model2.load_state_dict(saved, strict=True)
    assert not loaded.missing_keys and not loaded.unexpected_keys
    for name, param in model2.named_parameters():
        assert torch.equal(model2.state_dict()[name], saved[name]), name
        if stored_weight(param) is not None:
            codes, scales = int8_rounding(exact(other, param))
            assert torch.equal(stored_weight(param).codes, codes) and torch.equal(stored_weight(param).scales, scales)
    bad = {**saved, "lm_head.weight": torch.zeros(3, 3)}
    with pytest.raises(RuntimeError, match="size mismatch for lm_head.weight"):
        model2.load_state_dict(bad)


def test_resume_from_save_state_is_bit_identical(tmp_path, fresh_accelerate_state):
    straight, resumed = straight_and_resumed(MIXED, tmp_path / "ckpt", steps=8)
    for p0, p1 in zip(straight[1].parameters(), resumed[1].parameters()):
        assert torch.equal(exact(straight[0], p0), exact(resumed[0], p1))
        if stored_weight(p0) is not None:
            assert torch.equal(stored_weight(p0).codes, stored_weight(p1).codes)
        s0, s1 = straight[2].optimizer.state.get(p0, {}), resumed[2].optimizer.state.get(p1, {})
        assert s0.keys() == s1.keys() and all(torch.equal(s0[k], s1[k]) for k in s0)
    assert resumed[0].controller.step == 8


def test_deepspeed_and_fsdp_are_refused_before_anything_changes():
    from accelerate.utils import DistributedType

    for kind, match in ((DistributedType.DEEPSPEED, "DeepSpeed ZeRO owns"), (DistributedType.FSDP, "FSDP2 owns")):
        slimfit = SlimFit.from_config({**CONFIG, "optimizer_paging": False})
        model = slimfit.prepare_model(tiny_llama())
        accelerator = SimpleNamespace(distributed_type=kind, num_processes=1, mixed_precision="no", is_fsdp2=True)
        with pytest.raises(IntegrationError, match=f"frozen_weights: int8 .*{match}.*remove frozen_weights") as err:
            slimfit.attach(accelerator, model, torch.optim.AdamW(model.parameters()))
        assert len(str(err.value).splitlines()) == 1
        assert all(stored_weight(p) is None and not torch.isnan(p).any() for p in model.parameters())


def test_unsupported_owners_stay_full_precision_with_a_warning():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    gpt2 = lambda: GPT2LMHeadModel(GPT2Config(vocab_size=64, n_positions=32, n_embd=32, n_layer=1, n_head=2))  # noqa: E731
    with pytest.warns(UserWarning, match="frozen_weights: int8 keeps .* full precision .*Conv1D"):
        slimfit, model, optimizer = start({**CONFIG, "optimizer_paging": False}, gpt2)
    assert stored_weight(model.transformer.wte.weight) is not None  # the tied embedding and head: int8
    assert stored_weight(model.transformer.h[0].attn.c_attn.weight) is None
    train(slimfit, model, optimizer, steps=2)


@pytest.mark.slow
def test_ddp_two_processes_ranks_agree_and_equal_the_reference(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "DS_ACCELERATOR": "cpu"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(WORKERS / "frozen_int8_worker.py"), "--out", str(tmp_path)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    results = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in range(2)]
    for result in results:
        assert result["world"] == 2 and result["changing"] and result["stored"] > 0
        assert result["masters_equal"] and result["codes_equal"] and result["state_equal"]
    assert results[0]["checksum"] == results[1]["checksum"]


@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16_autocast"])
def test_a_frozen_head_is_dequantised_a_slice_of_rows_at_a_time_in_the_chunked_loss(monkeypatch, autocast):
    """A vocabulary-sized frozen head is never dequantised whole in the chunked loss (an 8B Llama's
    would be 1 GiB): each chunk of tokens takes its logits and its input gradient from slices of
    rows. Same loss and hidden-state gradient as the whole dequantised head, within rounding."""
    from slimfit_accel import frozen_int8
    from slimfit_accel.chunked_loss import chunked_linear_cross_entropy

    torch.manual_seed(0)
    vocab, width = 1000, 16
    param = torch.nn.Parameter(torch.randn(vocab, width) * 0.2, requires_grad=False)
    codes, scales = frozen_int8.quantize(param.detach())
    stored = frozen_int8.StoredWeight("lm_head.weight", param, codes, scales, torch.full((1,), float("nan")))
    whole = frozen_int8.dequantize(codes, scales, torch.float32)
    labels = torch.randint(0, vocab, (2 * 24,))
    labels[::5] = -100
    base = torch.randn(2, 24, width)

    def loss_and_grad(weight):
        hidden = base.clone().requires_grad_(True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = chunked_linear_cross_entropy(hidden, weight, None, labels, chunk_size=16)
        loss.backward()
        return loss.detach(), hidden.grad

    expected = loss_and_grad(whole)
    one_slice = loss_and_grad(stored)  # the head fits one slice: the same kernels as the whole weight
    assert torch.equal(one_slice[0], expected[0]) and torch.equal(one_slice[1], expected[1])
    monkeypatch.setattr(frozen_int8, "ROW_CHUNK_BYTES", 4 * width * 128)  # 128 rows a slice: 8 slices
    monkeypatch.setattr(frozen_int8.StoredWeight, "dequantize", lambda self: pytest.fail("the whole head was dequantised"))
    sliced = loss_and_grad(stored)
    tol = dict(rtol=2e-2, atol=1e-4) if autocast else dict(rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(sliced[0], expected[0], **tol)
    torch.testing.assert_close(sliced[1], expected[1], **tol)
    assert sliced[1].abs().sum() > 0
