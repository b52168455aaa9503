"""What a module computes (kinds), the RMSNorm and gated-MLP swaps, and the exact ReLU sign rule."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from slimfit_accel.compression import CompressionPolicy, Rule, compressed_activations, installed_compressor_factories
from slimfit_accel.compression.gated_mlp import swap_gated_mlps
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


class FakeRMSNorm(nn.Module):  # named and built like an RMSNorm, computes an L1 normalisation
    def __init__(self, n):
        super().__init__()
        self.weight, self.eps = nn.Parameter(torch.randn(n)), 1e-6

    def forward(self, x):
        return self.weight * x / (x.abs().mean(-1, keepdim=True) + self.eps)


class IgnoresItsScale(nn.Module):  # an RMSNorm without affine scale that still holds a weight of ones
    def __init__(self, n):
        super().__init__()
        self.weight, self.eps = nn.Parameter(torch.ones(n)), 1e-6

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)


def partitioned(module: nn.Module) -> nn.Module:
    """``module`` with its parameters emptied as ZeRO-3 leaves them after ``accelerator.prepare``
    (no data, the full shape in ``ds_shape``)."""
    for param in module.parameters():
        param.ds_shape = param.shape
        param.data = torch.empty(0, dtype=param.dtype)
    return module


@pytest.mark.parametrize("without_data", ["zero3", "meta"])
def test_rmsnorms_without_weight_data_are_still_told_by_what_they_compute(without_data):
    """No name fallback: a same-class copy with random weights of the full shape is probed."""
    from transformers.models.gemma.modeling_gemma import GemmaRMSNorm
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    empty = partitioned if without_data == "zero3" else (lambda module: module.to("meta"))
    llama, gemma, fake = empty(LlamaRMSNorm(16)), empty(GemmaRMSNorm(16)), empty(FakeRMSNorm(16))
    assert is_rmsnorm(llama)
    assert not is_rmsnorm(gemma), "GemmaRMSNorm computes (1 + w) * x_hat: swapped it would be w * x_hat"
    assert not is_rmsnorm(fake)
    assert llama.weight.numel() == 0 or llama.weight.is_meta  # the probe never touched the module's own weight


def test_a_norm_that_ignores_its_weight_is_not_swapped_though_its_weight_is_ones():
    assert not is_rmsnorm(IgnoresItsScale(16))  # w = 1 now; swapped, w * x_hat once the weight trains


def test_gated_mlps_without_weight_data_are_swapped_by_what_they_compute():
    from transformers.models.llama.modeling_llama import LlamaConfig, LlamaMLP

    config = LlamaConfig(hidden_size=16, intermediate_size=40, num_attention_heads=2, num_key_value_heads=2, hidden_act="silu")
    mlp = partitioned(LlamaMLP(config))
    assert swap_gated_mlps(mlp)[0] == [mlp] and mlp._slimfit_swap == ("gate_proj", "up_proj", "down_proj", "act_fn")
    odd = partitioned(UpFirst())
    assert swap_gated_mlps(odd)[0] == [odd] and odd._slimfit_swap == ("a", "b", "c", "act")


def test_gemma_output_and_gradients_are_unchanged_by_the_swaps():
    """Gemma's norms compute (1 + w) * x_hat (they stay as they are); its gated MLPs are swapped."""
    from test_compression_architectures import batch, build

    model = build("gemma").eval()  # no dropout: the same forward in both runs
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.add_(torch.randn_like(param))
    inputs = batch("gemma")
    want = model(**inputs)
    want.loss.backward()
    want_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    with compressed_activations(model, CompressionPolicy(), compressors=FACTORIES) as engine:  # stores all exactly
        swapped = {type(m).__name__ for m in model.modules() if "_slimfit_swap" in m.__dict__}
        got = model(**inputs)
    got.loss.backward()
    assert swapped == {"GemmaMLP"}
    assert engine.stats.raw_bytes > 0
    torch.testing.assert_close(got.logits, want.logits, rtol=0, atol=0)
    for name, param in model.named_parameters():
        torch.testing.assert_close(param.grad, want_grads[name], rtol=1e-5, atol=1e-6, msg=name)


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


class UpFirst(nn.Module):  # a gated MLP whose children are named the other way round
    def __init__(self):
        super().__init__()
        self.a, self.b, self.c, self.act = nn.Linear(8, 24), nn.Linear(8, 24), nn.Linear(24, 8), nn.GELU()

    def forward(self, x):
        return self.c(self.b(x) * self.act(self.a(x)))


def test_gated_mlps_are_told_by_what_they_compute():
    from test_compression_architectures import build

    for arch in ("llama", "mistral", "qwen2"):
        model = build(arch)
        swapped, restore = swap_gated_mlps(model)
        assert len(swapped) == 2 and all(m._slimfit_swap == ("gate_proj", "up_proj", "down_proj", "act_fn") for m in swapped), arch
        restore()
        assert not any("forward" in m.__dict__ for m in model.modules())
    odd = UpFirst()
    assert swap_gated_mlps(odd)[0] == [odd] and odd._slimfit_swap == ("a", "b", "c", "act")
    # not gated (GPT-2, BERT), or with dropout inside (T5's gated-GELU): their own forward stays
    t5 = transformers.T5ForConditionalGeneration(transformers.T5Config(
        d_model=16, d_kv=4, d_ff=32, num_layers=1, num_decoder_layers=1, num_heads=4, vocab_size=32,
        feed_forward_proj="gated-gelu", decoder_start_token_id=0))
    for model in (build("gpt2"), build("bert"), t5):
        assert swap_gated_mlps(model)[0] == []


@pytest.mark.parametrize("projections_trainable", [True, False])
def test_gated_mlp_swap_is_exact(projections_trainable):
    from transformers.models.llama.modeling_llama import LlamaConfig, LlamaMLP

    torch.manual_seed(0)
    mlp = LlamaMLP(LlamaConfig(hidden_size=16, intermediate_size=40, num_attention_heads=2, num_key_value_heads=2, hidden_act="silu"))
    for name in ("gate_proj", "up_proj"):
        getattr(mlp, name).weight.requires_grad_(projections_trainable)
    x = torch.randn(3, 5, 16, requires_grad=True)
    g = torch.randn(3, 5, 16)
    native = mlp(x)
    native.backward(g)
    want = {n: p.grad.clone() for n, p in mlp.named_parameters() if p.grad is not None}
    gx = x.grad.clone()
    mlp.zero_grad(set_to_none=True)
    x.grad = None
    swapped, restore = swap_gated_mlps(mlp)
    assert swapped == [mlp]
    out = mlp(x)
    torch.testing.assert_close(out, native, rtol=0, atol=0)  # the same forward arithmetic
    out.backward(g)
    torch.testing.assert_close(x.grad, gx, rtol=1e-5, atol=1e-6)
    got = {n: p.grad for n, p in mlp.named_parameters() if p.grad is not None}
    assert got.keys() == want.keys() and len(got) == (3 if projections_trainable else 1)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-6)
    restore()


def test_gated_mlp_keeps_two_wide_tensors_instead_of_three():
    from test_compression_architectures import batch, build

    model = build("llama")
    exact = CompressionPolicy()  # compresses nothing: raw bytes only
    with compressed_activations(model, exact, compressors=FACTORIES, swap_layernorm=False) as engine:
        model(**batch("llama")).loss.backward()
    native = engine.stats.raw_bytes
    with compressed_activations(model, exact, compressors=FACTORIES) as engine:
        model(**batch("llama")).loss.backward()
    # per layer: g, act(g), u (4 x 32 x 176 floats each) -> g, u; the norm swaps save less too
    wide = 4 * 32 * 176 * 4
    assert native - engine.stats.raw_bytes >= 2 * wide


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
