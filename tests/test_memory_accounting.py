"""MemoryMeter bytes by category against sizes computed by hand."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

from slimfit_accel import SlimFit
from slimfit_accel.compression import CompressionEngine, CompressionPolicy, CompressorSpec, Rule, slimfit_policy
from slimfit_accel.compression.registry import installed_compressor_factories
from slimfit_accel.memory import MemoryMeter, parameter_bytes

from conftest import random_batch, tiny_bert

F32 = 4
B, D = 64, 16  # batch and width of the small model: activations dominate gradients

# Small model: Linear(16,16) -> LayerNorm(16) -> Linear(16,16).
PARAMS = 2 * (D * D + D) * F32 + 2 * D * F32  # two Linears + LayerNorm scale and shift = 2304
ADAMW = 2 * PARAMS + 6 * F32  # exp_avg + exp_avg_sq, plus a float32 step tensor per parameter
ACT_X = B * D * F32  # one (64, 16) float32 activation = 4096
ROW = B * F32  # one value per row (LayerNorm mean, 1/std; an int8 row scale) = 256
# What autograd saves: input of Linear 1; LayerNorm input, mean, 1/std (its weight and bias
# are parameters); input of Linear 2. ``out.sum()`` saves no tensor.
SAVED = ACT_X + (ACT_X + 2 * ROW) + ACT_X  # = 12800


def small_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(D, D), nn.LayerNorm(D), nn.Linear(D, D))


def train_steps(model, optimizer, meter, steps=2, set_to_none=True, step_ctx=None):
    x = torch.randn(B, D, generator=torch.Generator().manual_seed(1))
    for _ in range(steps):
        with meter.step():
            ctx = step_ctx() if step_ctx is not None else _null()
            with ctx:
                model(x).sum().backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=set_to_none)
    return meter.last


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_small_model_every_category_by_hand():
    model = small_model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    meter = MemoryMeter(model, optimizer)
    first = train_steps(model, optimizer, meter, steps=1)
    # First step: no optimizer state during forward; it appears in optimizer.step() while all
    # gradients are alive. Peak = max(params + activations, params + grads + optimizer).
    assert (first.params, first.grads, first.optimizer) == (PARAMS, PARAMS, ADAMW)
    assert first.activations == first.activations_raw == SAVED
    assert first.total == max(PARAMS + SAVED, PARAMS + PARAMS + ADAMW)
    second = train_steps(model, optimizer, meter, steps=1)
    # Steady step: state exists from the start; peak at the end of forward (no grads yet).
    assert (second.params, second.grads, second.optimizer, second.activations) == (PARAMS, PARAMS, ADAMW, SAVED)
    assert second.total == PARAMS + ADAMW + SAVED
    report = meter.summary()
    assert report.steps == 2 and report.peak.total == PARAMS + ADAMW + SAVED
    data = report.to_dict()
    assert data["last"]["optimizer"] == ADAMW and data["peak"]["peak_cuda"] is None
    text = report.render()
    assert "optimizer state" in text and "total (peak of the sum)" in text
    meter.close()


def test_gradients_kept_between_steps_count_from_the_start():
    model = small_model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    meter = MemoryMeter(model, optimizer)
    train_steps(model, optimizer, meter, steps=1, set_to_none=False)
    second = train_steps(model, optimizer, meter, steps=1, set_to_none=False)
    # zero_grad(set_to_none=False) zeroes in place: the gradient memory stays allocated.
    assert second.total == PARAMS + ADAMW + PARAMS + SAVED
    meter.close()


def test_frozen_layer_saves_no_input_and_has_no_grad_or_state():
    model = small_model()
    for p in model[0].parameters():
        p.requires_grad_(False)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    meter = MemoryMeter(model, optimizer)
    last = train_steps(model, optimizer, meter, steps=2)
    trainable = PARAMS - (D * D + D) * F32
    assert last.params == PARAMS
    assert last.grads == trainable
    assert last.optimizer == 2 * trainable + 4 * F32
    assert last.activations == SAVED - ACT_X  # Linear 1 is frozen and its input needs no grad
    meter.close()


class Half:
    """Test compressor: stores float16, so a packed tensor is exactly half the raw bytes."""

    def pack(self, tensor, ctx=None):
        return tensor.half()

    def unpack(self, packed):
        return packed.float()


def test_compressed_bytes_are_the_packed_tensor_sizes():
    model = small_model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    factories = dict(installed_compressor_factories(), half=Half)
    policy = CompressionPolicy(
        rules=(
            Rule(path="0", compressor=CompressorSpec(name="half")),  # input of Linear 1
            Rule(path="2", compressor=CompressorSpec(name="int8")),  # input of Linear 2
        )
    )
    engine = CompressionEngine(model, policy, compressors=factories, swap_layernorm=False).attach()
    meter = MemoryMeter(model, optimizer, engine)
    last = train_steps(model, optimizer, meter, steps=2, step_ctx=engine.step)
    int8 = B * D + ROW  # one byte per element + a float32 scale per row
    stored = ACT_X // 2 + (ACT_X + 2 * ROW) + int8
    assert last.activations_raw == SAVED
    assert last.activations == stored
    assert last.total == PARAMS + ADAMW + stored
    assert meter.summary().by_compressor == {"half": [ACT_X, ACT_X // 2], "int8": [ACT_X, int8], "none": [ACT_X + 2 * ROW] * 2}
    meter.close()
    engine.detach()


def _tensors(obj):
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, (tuple, list)):
        for item in obj:
            yield from _tensors(item)
    elif dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        for f in dataclasses.fields(obj):
            yield from _tensors(getattr(obj, f.name))


class Recorder:
    """Wraps a compressor factory and records the size of every object it packs."""

    def __init__(self, factory, log):
        self.factory, self.log = factory, log

    def __call__(self, **options):
        inner, log = self.factory(**options), self.log

        class Recording:
            def pack(self, tensor, ctx=None):
                packed = inner.pack(tensor, ctx)
                log.append(sum(t.numel() * t.element_size() for t in _tensors(packed)))
                return packed

            def unpack(self, packed):
                return inner.unpack(packed)

        return Recording()


def test_tiny_bert_frozen_units_and_slimfit_compression():
    model = tiny_bert()
    slimfit = SlimFit.from_config({"scheduler": {"name": "ils", "freeze_ratio": 0.75}, "compression": "none"})
    model = slimfit.prepare_model(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    slimfit.attach(None, model, optimizer)
    log: list[int] = []
    factories = {name: Recorder(factory, log) for name, factory in installed_compressor_factories().items()}
    engine = CompressionEngine(model, slimfit_policy(), compressors=factories).attach()
    meter = MemoryMeter(model, optimizer, engine)
    batch = random_batch(batch=8, length=16)
    for _ in range(2):  # a quarter of the units trains per step: half have optimizer state after two
        log.clear()
        state_before = sum(t.numel() * t.element_size() for s in optimizer.state.values() for t in s.values())
        with meter.step(), slimfit.step(), engine.step():
            loss = model(**batch).loss
            after_forward = (engine.live_packed_bytes, engine.live_raw_bytes)
            # every saved tensor went through a compressor's pack, or was kept as is ("-")
            kept = engine.stats.by_compressor.get("-", [0, 0])[1]
            assert after_forward[0] == sum(log) + kept
            loss.backward()
            grads = sum(p.grad.numel() * p.grad.element_size() for p in model.parameters() if p.grad is not None)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    last = meter.last
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    state = sum(t.numel() * t.element_size() for s in optimizer.state.values() for t in s.values())
    assert last.params == params
    assert 0 < last.optimizer == state < 2 * params + 4 * len(list(model.parameters()))  # frozen units: no state yet
    assert 0 < last.grads == grads < params
    assert (last.activations, last.activations_raw) == after_forward
    assert last.activations < last.activations_raw
    # the peak is at the end of forward or after the optimizer step, whichever is larger
    assert max(params + state_before + last.activations, params + state + grads) <= last.total
    assert last.total <= params + state + grads + last.activations
    slimfit.detach()
    engine.detach()
    meter.close()


def test_tied_weights_count_once_and_accelerate_optimizer_is_unwrapped():
    from accelerate import Accelerator
    from transformers import BertConfig, BertForMaskedLM

    torch.manual_seed(0)
    config = BertConfig(vocab_size=99, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, max_position_embeddings=32)
    model = BertForMaskedLM(config)
    unique = sum(p.numel() * 4 for p in model.parameters())
    every = sum(p.numel() * 4 for _, p in model.named_parameters(remove_duplicate=False))
    assert every - unique == (99 * 32 + 99) * 4  # decoder weight and bias are tied
    assert parameter_bytes(model) == unique
    accelerator = Accelerator(cpu=True)
    model, optimizer = accelerator.prepare(model, torch.optim.AdamW(model.parameters(), lr=1e-3))
    assert type(optimizer).__name__ == "AcceleratedOptimizer"
    meter = MemoryMeter(model, optimizer)
    batch = random_batch(batch=2, length=8)
    with meter.step():
        accelerator.backward(model(input_ids=batch["input_ids"], labels=batch["input_ids"]).loss)
        optimizer.step()
        optimizer.zero_grad()
    n_params = len(list(model.parameters()))
    assert meter.last.params == unique
    assert meter.last.optimizer == 2 * unique + 4 * n_params
    assert meter.last.grads == unique
    meter.close()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_allocator_peak_is_recorded():
    model = small_model().cuda()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    meter = MemoryMeter(model, optimizer)
    x = torch.randn(B, D, device="cuda")
    with meter.step():
        model(x).sum().backward()
        optimizer.step()
    assert meter.last.peak_cuda is not None and meter.last.peak_cuda >= meter.last.params
    meter.close()
