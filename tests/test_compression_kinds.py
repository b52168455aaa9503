"""What a module computes (kinds), the RMSNorm swap, and the exact ReLU sign rule."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from slimfit_accel.compression import CompressionPolicy, Rule, compressed_activations, installed_compressor_factories
from slimfit_accel.compression.kinds import module_kinds
from slimfit_accel.compression.rmsnorm import is_rmsnorm, swap_rmsnorms

transformers = pytest.importorskip("transformers")
FACTORIES = installed_compressor_factories()


def test_kinds_follow_what_modules_compute():
    from test_compression_architectures import build

    llama = module_kinds(build("llama"))
    assert llama["model.layers.0.mlp"] == "mlp" and llama["model.layers.0.mlp.down_proj"] == "ffn_down"
    assert llama["model.layers.0.mlp.act_fn"] == "activation"
    assert "model.layers.0.mlp.up_proj" not in llama and "model.layers.0.self_attn" not in llama
    t5 = module_kinds(build("t5"))
    assert t5["encoder.block.0.layer.1.DenseReluDense.act"] == "relu"
    assert t5["encoder.block.0.layer.1.DenseReluDense.wo"] == "ffn_down"
    bert = module_kinds(build("bert"))
    assert bert["bert.encoder.layer.0.intermediate.intermediate_act_fn"] == "activation"
    assert bert["bert.encoder.layer.0.output.LayerNorm"] == "norm"
    assert "bert.encoder.layer.0.intermediate" not in bert  # one projection: not a whole MLP


class GemmaStyle(nn.Module):  # weight applied as (1 + w): not a plain RMSNorm
    def __init__(self, n):
        super().__init__()
        self.weight, self.eps = nn.Parameter(torch.randn(n)), 1e-6

    def forward(self, x):
        return (1 + self.weight) * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)


def test_rmsnorms_are_told_by_what_they_compute():
    from transformers.models.llama.modeling_llama import LlamaRMSNorm
    from transformers.models.t5.modeling_t5 import T5LayerNorm

    assert is_rmsnorm(LlamaRMSNorm(16)) and is_rmsnorm(T5LayerNorm(16))
    assert not is_rmsnorm(GemmaStyle(16)) and not is_rmsnorm(nn.LayerNorm(16)) and not is_rmsnorm(nn.Linear(4, 4))


@pytest.mark.parametrize("trainable", [True, False])
def test_rmsnorm_swap_is_exact(trainable):
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    torch.manual_seed(0)
    norm = LlamaRMSNorm(32, eps=1e-5)
    with torch.no_grad():
        norm.weight.add_(torch.randn(32))
    norm.weight.requires_grad_(trainable)
    x = torch.randn(3, 5, 32, requires_grad=True)
    g = torch.randn(3, 5, 32)
    native = norm(x)
    native.backward(g)
    gx, gw = x.grad.clone(), norm.weight.grad
    x.grad = norm.weight.grad = None
    swapped, restore = swap_rmsnorms(norm)
    assert swapped == [norm]
    out = norm(x)
    assert torch.equal(out, native)  # same forward, bit for bit
    out.backward(g)
    torch.testing.assert_close(x.grad, gx, rtol=1e-5, atol=1e-6)
    if trainable:
        torch.testing.assert_close(norm.weight.grad, gw, rtol=1e-5, atol=1e-6)
    restore()
    assert "forward" not in norm.__dict__


def test_relu_sign_bits_give_exact_gradients():
    from test_compression_architectures import build, batch

    model = build("t5")
    arch = "t5"
    policy = CompressionPolicy(rules=[Rule(module_kind="relu", compressor={"name": "bitmask", "sign": True})])

    def grads(policy=None):
        model.zero_grad(set_to_none=True)
        torch.manual_seed(7)
        if policy is None:
            loss = model(**batch(arch)).loss
        else:
            with compressed_activations(model, policy, compressors=FACTORIES, swap_layernorm=False) as engine:
                loss = model(**batch(arch)).loss
            assert engine.stats.by_compressor["bitmask"][1] * 30 < engine.stats.by_compressor["bitmask"][0]
        loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    exact, packed = grads(), grads(policy)
    assert all(torch.equal(exact[n], packed[n]) for n in exact)


@pytest.mark.parametrize("peak", [0.0, 8.0])
def test_loss_log_probs_as_8_bit_probabilities_keep_the_logit_gradient(peak):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(64, 32000, generator=g)
    targets = torch.randint(0, 32000, (64,), generator=g)
    logits[torch.arange(64), targets] += peak  # confident rows too
    logits.requires_grad_(True)
    policy = CompressionPolicy(rules=[Rule(role="log_probs", compressor={"name": "int8", "log_domain": True})])
    exact = torch.autograd.grad(torch.nn.functional.cross_entropy(logits, targets), logits)[0]
    with compressed_activations(nn.Identity(), policy, compressors=FACTORIES) as engine:
        loss = torch.nn.functional.cross_entropy(logits, targets)
    approx = torch.autograd.grad(loss, logits)[0]
    assert engine.stats.by_compressor["int8"][0] >= 3.9 * engine.stats.by_compressor["int8"][1]  # 4x smaller
    assert torch.nn.functional.cosine_similarity(exact.flatten(), approx.flatten(), dim=0) > 0.999
    assert torch.isfinite(approx).all()
