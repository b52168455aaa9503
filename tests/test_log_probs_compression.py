"""A loss's log-softmax output stored in 8 bits keeps the gradient a language model trains on.

A pretrained LM's next-token distribution has a long tail: tens of thousands of tokens each far
below 1/510 of the top probability, together several percent of the mass. Storing the
probabilities with one absmax scale a row rounded that whole tail to zero: the error was small
per logit (cosine 1.0000 on the logits' gradient) but biased, all in the same direction for
every position, so the gradient reaching the hidden states (through the output embedding,
whose rows share a common direction in real LMs) was pushed one way at every token; on
SmolLM2-135M it turned a norm weight's gradient to cosine -0.77 and the training loss rose.
These tests use that shape: Zipf-like logits over a 32k vocabulary, anisotropic embeddings.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from slimfit_accel.compression import CompressionPolicy, Rule, compressed_activations, installed_compressor_factories
from slimfit_accel.strategies.compression.int8 import Int8Scaled

FACTORIES = installed_compressor_factories()
VOCAB, WIDTH, TOKENS = 32000, 64, 48


def lm_like(seed: int = 0):
    """Hidden states, an anisotropic output embedding, targets: logits with a Zipf-like tail."""
    g = torch.Generator().manual_seed(seed)
    common = torch.randn(WIDTH, generator=g)
    embedding = torch.randn(VOCAB, WIDTH, generator=g) * 0.3 + common  # rows share a direction
    # a per-token bias that falls like log(rank): a few likely tokens, a long, heavy tail
    bias = -1.1 * torch.log(torch.arange(1, VOCAB + 1, dtype=torch.float32))
    hidden = torch.randn(TOKENS, WIDTH, generator=g) * 0.5
    targets = torch.randint(0, 50, (TOKENS,), generator=g)
    return hidden, embedding, bias, targets


def grads(hidden, embedding, bias, targets, policy=None):
    hidden = hidden.clone().requires_grad_(True)
    embedding = embedding.clone().requires_grad_(True)
    if policy is None:
        loss = nn.functional.cross_entropy(hidden @ embedding.T + bias, targets)
    else:
        with compressed_activations(nn.Identity(), policy, compressors=FACTORIES):
            loss = nn.functional.cross_entropy(hidden @ embedding.T + bias, targets)
    return torch.autograd.grad(loss, (hidden, embedding))


def cosine(a, b):
    return nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0).item()


def test_the_tail_is_what_the_old_format_lost():
    hidden, embedding, bias, targets = lm_like()
    log_probs = torch.log_softmax(hidden @ embedding.T + bias, dim=-1)
    probs = log_probs.exp()
    below = probs < probs.amax(-1, keepdim=True) / 510
    assert (probs * below).sum(-1).mean() > 0.05  # the fixture has the heavy tail this is about


def test_log_probs_in_8_bits_keep_the_hidden_gradient_and_the_row_mass():
    hidden, embedding, bias, targets = lm_like()
    policy = CompressionPolicy(rules=[Rule(role="log_probs", compressor={"name": "int8", "log_domain": True})])
    exact_h, exact_e = grads(hidden, embedding, bias, targets)
    approx_h, approx_e = grads(hidden, embedding, bias, targets, policy)
    # what a norm weight's gradient sums: the hidden gradient over all positions
    assert cosine(exact_h.sum(0), approx_h.sum(0)) > 0.999
    assert cosine(exact_h, approx_h) > 0.999
    assert cosine(exact_e, approx_e) > 0.999
    log_probs = torch.log_softmax(hidden @ embedding.T + bias, dim=-1)
    compressor = Int8Scaled(log_domain=True)
    back = compressor.unpack(compressor.pack(log_probs))
    assert torch.allclose(back.exp().sum(-1), torch.ones(TOKENS), atol=0.01)  # the tail is kept
    assert (back - log_probs).abs().max() <= (log_probs.amax(-1) - log_probs.amin(-1)).max() / 510 + 1e-5


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_extreme_rows_pack_finite(dtype):
    x = torch.log_softmax(torch.randn(4, 300) * 5, dim=-1)
    x[0] = -float("inf")
    x[0, 3] = 0.0  # one certain token, the rest impossible
    x[1] = torch.log(torch.tensor(1 / 300))  # uniform: a zero range
    x = x.to(dtype)
    compressor = Int8Scaled(log_domain=True)
    back = compressor.unpack(compressor.pack(x))
    assert back.dtype == dtype and back.shape == x.shape
    assert torch.isfinite(back).all()
    assert back[0, 3] == 0 and back[0].float().exp().sum().item() == pytest.approx(1.0, abs=1e-6)
    assert torch.allclose(back[1].float(), x[1].float())
    assert torch.allclose(back[2:].float().exp().sum(-1), torch.ones(2), atol=0.02)


def test_log_probs_saved_twice_are_unpacked_once_with_the_same_gradients(monkeypatch):
    """Cross-entropy saves its log-probabilities twice (log-softmax and NLL loss): one unpack
    serves both backwards, the gradients equal those of unpacking each time, bit for bit."""
    hidden, embedding, bias, targets = lm_like(3)
    policy = CompressionPolicy(rules=[Rule(role="log_probs", compressor={"name": "int8", "log_domain": True})])
    unpacks = []
    unpack = Int8Scaled.unpack

    def counted(self, packed):
        if self.log_domain:
            unpacks.append(packed.codes.shape)
        return unpack(self, packed)

    monkeypatch.setattr(Int8Scaled, "unpack", counted)
    reused = grads(hidden, embedding, bias, targets, policy)
    assert len(unpacks) == 1
    from slimfit_accel.compression import engine

    original = engine._Saved.__init__

    def no_reuse(self, *args, reuse=False, **kwargs):
        original(self, *args, reuse=False, **kwargs)

    monkeypatch.setattr(engine._Saved, "__init__", no_reuse)
    unpacks.clear()
    each = grads(hidden, embedding, bias, targets, policy)
    assert len(unpacks) == 2
    for a, b in zip(reused, each):
        assert torch.equal(a, b)


def test_a_reused_unpack_is_dropped_after_its_last_use_and_retain_graph_works():
    hidden, embedding, bias, targets = lm_like(4)
    policy = CompressionPolicy(rules=[Rule(role="log_probs", compressor={"name": "int8", "log_domain": True})])
    hidden = hidden.clone().requires_grad_(True)
    with compressed_activations(nn.Identity(), policy, compressors=FACTORIES):
        loss = nn.functional.cross_entropy(hidden @ embedding.T + bias, targets)
    first = torch.autograd.grad(loss, hidden, retain_graph=True)[0]
    second = torch.autograd.grad(loss, hidden)[0]
    assert torch.equal(first, second)
