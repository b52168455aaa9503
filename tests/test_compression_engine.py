"""Compression engine: module context, parameters never compressed, byte accounting, dtypes,
the LayerNorm swap, HF models (eager and SDPA), gradient checkpointing, clean detach."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
import torch
from torch import nn

from slimfit_accel.compression import installed_compressor_factories, CompressionEngine, CompressionPolicy, Rule, compressed_activations, slimfit_policy
from slimfit_accel.compression.layernorm import swap_layernorms
from slimfit_accel.strategies.compression.int8 import Int8Scaled
from slimfit_accel.strategies.compression.none import NoCompression

transformers = pytest.importorskip("transformers")

FACTORIES = installed_compressor_factories()  # the built-ins, through the real plugin registry


@dataclass
class Spy:
    """Records every tensor and context it is asked to pack; optionally packs with ``inner``."""

    inner: object = None
    seen: list = field(default_factory=list)

    def pack(self, tensor, ctx):
        self.seen.append((tensor, ctx))
        return self.inner.pack(tensor, ctx) if self.inner else tensor

    def unpack(self, packed):
        return self.inner.unpack(packed) if self.inner else packed


def spy_policy(spy, min_numel=0):
    policy = CompressionPolicy(rules=[Rule(compressor={"name": "spy"})], min_numel=min_numel)
    return policy, {**FACTORIES, "spy": lambda: spy}


def make_model(kind: str, impl: str = "eager"):
    torch.manual_seed(0)
    t = transformers
    if kind == "bert":
        cfg = t.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                           vocab_size=50, max_position_embeddings=16, attn_implementation=impl)
        return t.BertForSequenceClassification(cfg)
    if kind == "vit":
        cfg = t.ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                          image_size=16, patch_size=8, num_labels=3, attn_implementation=impl)
        return t.ViTForImageClassification(cfg)
    if kind == "gpt2":
        cfg = t.GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=50, n_positions=16, attn_implementation=impl)
        return t.GPT2LMHeadModel(cfg)
    cfg = t.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                        num_key_value_heads=2, vocab_size=50, attn_implementation=impl, bos_token_id=0, eos_token_id=1)
    return t.LlamaForCausalLM(cfg)


def batch(kind: str):
    g = torch.Generator().manual_seed(1)
    if kind == "vit":
        return {"pixel_values": torch.randn(2, 3, 16, 16, generator=g), "labels": torch.tensor([0, 2])}
    ids = torch.randint(0, 50, (2, 8), generator=g)
    if kind == "bert":
        return {"input_ids": ids, "labels": torch.tensor([0, 1])}
    return {"input_ids": ids, "labels": ids}


def freeze_every_other_unit(model):
    units = [p for p in model.parameters() if p.dim() > 1]
    for i, p in enumerate(units):
        p.requires_grad_(i % 2 == 1)


def gradients(model, kind, policy=None, factories=FACTORIES, autocast=False, backward_inside=False, **engine_kwargs):
    model.zero_grad(set_to_none=True)
    torch.manual_seed(3)
    engine = None
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        if policy is None:
            loss = model(**batch(kind)).loss
        else:
            with compressed_activations(model, policy, compressors=factories, **engine_kwargs) as engine:
                loss = model(**batch(kind)).loss
                if backward_inside:
                    loss.backward()
    if not backward_inside:
        loss.backward()
    return {n: p.grad.float().clone() for n, p in model.named_parameters() if p.grad is not None}, engine


def cosines(exact, approx, floor=1e-6):
    """Cosine per unit whose exact gradient is not negligible (norm above floor x the largest)."""
    largest = max(g.norm() for g in exact.values())
    return {n: torch.nn.functional.cosine_similarity(g.flatten(), approx[n].flatten(), dim=0).item()
            for n, g in exact.items() if g.norm() > floor * largest}


def is_parameter_data(tensor, params):
    for p in params:
        if tensor.untyped_storage().data_ptr() == p.untyped_storage().data_ptr():
            return True
        for candidate in (p, p.t()) if p.dim() == 2 else (p,):
            if tensor.shape == candidate.shape and torch.equal(tensor.detach(), candidate.detach().to(tensor.dtype)):
                return True
    return False


# ------------------------------------------------------------------------------------ tests
@pytest.mark.parametrize(
    "kind,impl,autocast",
    [("bert", "eager", False), ("gpt2", "eager", False), ("gpt2", "sdpa", True), ("llama", "sdpa", True), ("vit", "eager", True)],
)
def test_parameters_never_reach_a_compressor(kind, impl, autocast):
    model = make_model(kind, impl).train()
    freeze_every_other_unit(model)  # frozen weights are saved (for input grads) as plain tensors
    if kind == "gpt2":
        assert model.lm_head.weight is model.transformer.wte.weight  # tied
    spy = Spy()
    gradients(model, kind, *spy_policy(spy), autocast=autocast)
    params = list(model.parameters())
    assert spy.seen, "the spy saw nothing: the test would prove nothing"
    leaked = [(ctx.module_path, tuple(t.shape)) for t, ctx in spy.seen if is_parameter_data(t, params)]
    assert not leaked


def test_frozen_linear_saves_no_input():
    layer = nn.Linear(8, 4)
    layer.weight.requires_grad_(False)  # bias stays trainable, as in SlimFit
    x = torch.randn(3, 5, 8, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        layer(x).sum().backward()
    assert all(t.untyped_storage().data_ptr() != x.untyped_storage().data_ptr() for t in saved)

    spy = Spy()
    with compressed_activations(layer, *spy_policy(spy)[:1], compressors=spy_policy(spy)[1]) as engine:
        layer(x).sum().backward()
    assert spy.seen == [] and engine.stats.raw_bytes == 0

    layer.weight.requires_grad_(True)
    with compressed_activations(layer, *spy_policy(spy)[:1], compressors=spy_policy(spy)[1]):
        layer(x).sum().backward()
    (tensor, ctx), = spy.seen
    assert ctx.role == "input" and not ctx.frozen and tensor.numel() == x.numel()


def test_module_context_names_path_type_role_and_frozen_state():
    model = make_model("bert").train()
    model.bert.encoder.layer[0].intermediate.dense.weight.requires_grad_(False)
    model.bert.encoder.layer[1].output.LayerNorm.weight.requires_grad_(False)
    spy = Spy()
    with compressed_activations(model, *spy_policy(spy)[:1], compressors=spy_policy(spy)[1]) as engine:
        model(**batch("bert")).loss.backward()
        assert engine._context.depth == 0
    contexts = {(c.module_path, c.role): c for _, c in spy.seen}
    assert "bert.encoder.layer.0.intermediate.dense" not in {p for p, _ in contexts}  # frozen: no input
    assert contexts[("bert.encoder.layer.1.intermediate.dense", "input")].frozen is False
    ln = contexts[("bert.encoder.layer.1.output.LayerNorm", "normalized")]
    assert ln.frozen is True and ln.module_type == "LayerNorm"
    assert contexts[("bert.encoder.layer.0.output.LayerNorm", "normalized")].frozen is False
    assert ("bert.encoder.layer.1.output.LayerNorm", "rstd") in contexts
    assert contexts[("bert.encoder.layer.0.intermediate.intermediate_act_fn", "input")].module_type == "GELUActivation"
    assert any(p == "bert.encoder.layer.0.attention.self" for p, _ in contexts)


def test_packed_bytes_are_the_sizes_of_the_packed_tensors():
    model = make_model("bert").train()
    # Raw bytes: what plain autograd saves (unique tensors, parameters excluded).
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    plain = {}

    def record(t):
        if not isinstance(t, nn.Parameter) and t.untyped_storage().data_ptr() not in params:
            plain[(t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride())] = t.numel() * t.element_size()
        return t

    torch.manual_seed(3)
    with torch.autograd.graph.saved_tensors_hooks(record, lambda t: t):
        model(**batch("bert")).loss.backward()

    sizes = []

    class Sized(Int8Scaled):
        def pack(self, tensor, ctx):
            packed = super().pack(tensor, ctx)
            sizes.append(packed.codes.numel() + 4 * packed.scale.numel())
            return packed

    policy = CompressionPolicy(rules=[Rule(compressor={"name": "sized"})], min_numel=0)
    model.zero_grad()
    torch.manual_seed(3)
    with compressed_activations(model, policy, compressors={"none": NoCompression, "sized": Sized}, swap_layernorm=False) as engine:
        loss = model(**batch("bert")).loss
        stats = engine.stats
        kept = stats.by_compressor.get("-", [0, 0])[1]  # bool/int tensors kept as they are
        assert stats.packed_bytes == sum(sizes) + kept
        assert stats.raw_bytes == sum(plain.values())
        assert engine.live_packed_bytes == stats.packed_bytes == stats.peak_packed_bytes
        assert stats.packed_bytes < stats.raw_bytes / 3
    loss.backward()
    del loss
    assert engine.live_packed_bytes == 0 and engine.live_raw_bytes == 0  # freed after backward
    assert engine.stats.peak_packed_bytes == stats.packed_bytes


def test_a_tensor_saved_twice_is_packed_once():
    model = make_model("bert").train()
    spy = Spy(inner=Int8Scaled())
    with compressed_activations(model, *spy_policy(spy)[:1], compressors=spy_policy(spy)[1]):
        model(**batch("bert")).loss.backward()
    inputs = [c.module_path for _, c in spy.seen if c.role == "input" and c.module_path.endswith(("query", "key", "value"))]
    assert len(inputs) == 2  # Q, K and V read the same LayerNorm output: one pack per layer


class _QKV(nn.Module):
    """Three Linears reading one input (attention's Q, K, V) and a rotary-like factor that every
    one multiplies: each saved tensor has three saves."""

    def __init__(self, width: int):
        super().__init__()
        self.q, self.k, self.v = (nn.Linear(width, width) for _ in range(3))
        self.register_buffer("cos", torch.randn(width))

    def forward(self, x):
        x = x * 1.5
        return sum((layer(x) * self.cos).sum() for layer in (self.q, self.k, self.v))


@pytest.mark.parametrize("rows", [4, 600], ids=["small", "large"])  # 600 x 512 floats: above KEEP_UNPACKED_BYTES
def test_a_tensor_saved_thrice_is_decompressed_once_with_the_same_gradients(rows, monkeypatch):
    from slimfit_accel.compression import engine as engine_module

    torch.manual_seed(0)
    model, x = _QKV(512), torch.randn(rows, 512, requires_grad=True)
    policy = CompressionPolicy(rules=[Rule(compressor={"name": "int8"})], min_numel=0, min_ndim=1)
    unpacks = []
    unpack = Int8Scaled.unpack
    monkeypatch.setattr(Int8Scaled, "unpack", lambda self, packed: unpacks.append(packed.shape) or unpack(self, packed))

    def grads():
        unpacks.clear()
        model.zero_grad()
        x.grad = None
        with compressed_activations(model, policy, compressors=FACTORIES):
            loss = model(x)
        loss.backward()
        return [x.grad.clone()] + [p.grad.clone() for p in model.parameters()], list(unpacks)

    reused, once = grads()
    # the input, read by the three weight gradients, and the factor, by the three input gradients
    assert once.count(torch.Size([rows, 512])) == 1 and once.count(torch.Size([512])) == 1
    original = engine_module._Saved.__init__
    monkeypatch.setattr(engine_module._Saved, "__init__", lambda self, *a, reuse=False, **k: original(self, *a, reuse=False, **k))
    each, every = grads()
    assert every.count(torch.Size([rows, 512])) == 3 and every.count(torch.Size([512])) == 3
    assert all(torch.equal(a, b) for a, b in zip(reused, each))


def test_a_large_unpack_waits_only_until_another_holder_is_decompressed():
    """``"next"``: kept for the holder's next save unless another holder is decompressed first
    (at most one large unpacked tensor waits); ``"all"``: kept whatever comes between."""
    from slimfit_accel.compression.accounting import ByteCounter
    from slimfit_accel.compression.engine import _Saved

    calls = []
    compressor = Int8Scaled()
    counter = ByteCounter()

    def holder(reuse):
        packed = compressor.pack(torch.randn(3, 8))
        saved = _Saved(packed, Spy(inner=compressor), torch.float32, 0, 0, counter, reuse=reuse)
        saved.compressor.unpack = lambda p, saved=saved: calls.append(saved) or compressor.unpack(p)
        saved.saves = 2
        return saved

    a, b, small = holder("next"), holder("next"), holder("all")
    for saved in (a, a, small, b, a, b, small):
        CompressionEngine._unpack(saved)
    # a's second save takes its first unpack; small is kept past b and a; b is given up when a
    # is decompressed (a new round for a: both its saves were served), a when b is again
    assert calls == [a, small, b, a, b]
    assert a.cached is None and b.cached is None and small.cached is None and _Saved.waiting is None


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_tensors_come_back_in_their_dtype(dtype):
    model = make_model("bert").train().to(dtype)
    spy = Spy(inner=Int8Scaled())
    exact, _ = gradients(model, "bert")
    approx, _ = gradients(model, "bert", *spy_policy(spy))
    assert {c.dtype for _, c in spy.seen} == {dtype}
    assert all(p.grad.dtype == dtype for p in model.parameters() if p.grad is not None)
    # Half-precision rounding noise swamps gradients below ~1e-3 of the largest (key biases).
    assert min(cosines(exact, approx, floor=1e-3).values()) > 0.99


@pytest.mark.parametrize("trainable", [(True, True, True), (False, True, True), (True, False, False), (False, False, True)])
def test_layernorm_swap_is_exact(trainable):
    torch.manual_seed(0)
    native = nn.LayerNorm(16)
    nn.init.normal_(native.weight)
    nn.init.normal_(native.bias)
    swapped = nn.LayerNorm(16)
    swapped.load_state_dict(native.state_dict())
    restore = swap_layernorms(swapped)
    x = torch.randn(3, 4, 16) * 3 + 1
    grads = []
    for module in (native, swapped):
        xi = x.clone().requires_grad_(trainable[0])
        module.weight.requires_grad_(trainable[1])
        module.bias.requires_grad_(trainable[2])
        out = module(xi)
        (out * torch.linspace(-1, 1, 16)).pow(2).sum().backward()
        grads.append((out, *(t.grad for t in (xi, module.weight, module.bias))))
    for a, b in zip(*grads):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    restore()
    assert "forward" not in swapped.__dict__


def test_layernorm_swap_follows_autocast():
    layer = nn.LayerNorm(8)
    swap_layernorms(layer)
    x = torch.randn(2, 8, dtype=torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert layer(x).dtype == torch.float32  # as native layer_norm under autocast
    assert layer.to(torch.bfloat16)(x).dtype == torch.bfloat16


@pytest.mark.parametrize("kind", ["bert", "vit", "gpt2", "llama"])
@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_default_policy_on_transformers_models(kind, impl):
    model = make_model(kind, impl).train()
    freeze_every_other_unit(model)
    exact, _ = gradients(model, kind)
    approx, engine = gradients(model, kind, slimfit_policy())
    cos = cosines(exact, approx)
    assert set(cos) <= set(approx) and min(cos.values()) > 0.9 and sum(cos.values()) / len(cos) > 0.97
    assert engine.stats.packed_bytes < engine.stats.raw_bytes
    assert not any(m._forward_pre_hooks or m._forward_hooks for m in model.modules())  # detached


@pytest.mark.parametrize("reentrant", [False, True])
def test_composes_with_gradient_checkpointing(reentrant):
    model = make_model("bert").train()
    freeze_every_other_unit(model)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    exact, _ = gradients(model, "bert")
    everything = CompressionPolicy(rules=[Rule(compressor={"name": "int8"})], min_numel=0)
    # Backward inside the block: the recomputation must see the same LayerNorm as the forward.
    approx, engine = gradients(model, "bert", everything, backward_inside=True)
    cos = cosines(exact, approx)
    assert set(cos) <= set(approx) and min(cos.values()) > 0.99
    # Non-reentrant: checkpoint's own hooks are innermost inside the blocks, so the engine only
    # sees what is saved outside them. Reentrant: block inputs are saved by the checkpoint function
    # and the recomputation in backward is packed too (one block at a time: a lower peak).
    assert "int8" in engine.stats.by_compressor
    model.gradient_checkpointing_disable()
    _, plain = gradients(model, "bert", everything)
    assert engine.stats.peak_raw_bytes < plain.stats.peak_raw_bytes


def test_engine_reused_across_steps_resets_statistics():
    model = make_model("bert").train()
    engine = CompressionEngine(model, slimfit_policy(), compressors=FACTORIES).attach()
    totals = []
    for _ in range(2):
        with engine.step():
            model(**batch("bert")).loss.backward()
        totals.append((engine.stats.raw_bytes, engine.stats.packed_bytes))
    engine.detach()
    assert totals[0] == totals[1] and totals[0][1] < totals[0][0]
    assert engine.live_packed_bytes == 0


@pytest.mark.parametrize("kind", ["llama", "bert"])
def test_a_norms_one_value_a_row_rstd_is_kept_as_it_is(kind):
    """1/rms (RMSNorm) and 1/std (LayerNorm) hold one value a row: a per-row format would store a
    4-byte scale for each and cost a pack call, so the default policy keeps them."""
    model = make_model(kind).train()
    freeze_every_other_unit(model)
    engine = CompressionEngine(model, slimfit_policy(), compressors=FACTORIES).attach()
    chosen, pick = [], engine.compressor_for

    def spy(ctx):
        choice = pick(ctx)
        chosen.append((ctx.role, ctx.shape, choice[0]))
        return choice

    engine.compressor_for = spy
    ids = torch.randint(0, 50, (8, 16), generator=torch.Generator().manual_seed(1))  # 128 rows: above min_numel
    with engine.step():
        model(input_ids=ids, labels=ids if kind == "llama" else torch.zeros(8, dtype=torch.long)).loss.backward()
    engine.detach()
    rstd = [(shape, name) for role, shape, name in chosen if role == "rstd"]
    assert rstd and all(shape[-1] == 1 and name == "none" for shape, name in rstd), rstd
    assert any(name != "none" for role, _, name in chosen if role == "normalized")  # the norms' other output still packed


class _LogNormaliser(torch.autograd.Function):
    """log_softmax(x)[target] that saves its log-normaliser, a 1-D vector (as fused LM heads do);
    the logits it saves are tagged ``exact_logits`` (a rule keeps them), so only log_z is in question."""

    @staticmethod
    def forward(ctx, logits, target):
        from slimfit_accel.compression.roles import tag_role

        log_z = torch.logsumexp(logits, dim=-1)
        tag_role(logits, "exact_logits")
        ctx.save_for_backward(logits, log_z, target)
        return logits.gather(-1, target[:, None]).squeeze(-1) - log_z

    @staticmethod
    def backward(ctx, grad):
        logits, log_z, target = ctx.saved_tensors
        probs = torch.exp(logits - log_z[:, None])
        return grad[:, None] * (torch.nn.functional.one_hot(target, logits.shape[-1]) - probs), None


def test_a_one_dimensional_statistic_is_saved_exactly():
    """A 1-D saved tensor (here a log-normaliser per token, as TRL's fused LM head saves) is kept:
    a per-row format gives the whole vector one scale, which shifts every probability of a token
    (what the default policy did to TRL's log_z before: a biased gradient)."""
    logits = torch.randn(256, 300, generator=torch.Generator().manual_seed(0)) * 4
    target = torch.randint(0, 300, (256,), generator=torch.Generator().manual_seed(1))
    int8 = CompressionPolicy(rules=(Rule(role="exact_logits", compressor={"name": "none"}),), default={"name": "int8"}, min_numel=1)

    def grad(policy):
        leaf = logits.clone().requires_grad_(True)
        engine = CompressionEngine(nn.Identity(), policy, compressors=FACTORIES).attach() if policy else None
        with engine.step() if engine else torch.enable_grad():
            _LogNormaliser.apply(leaf * 1.0, target).sum().backward()
        if engine:
            engine.detach()
        return leaf.grad

    exact = grad(None)
    assert torch.equal(grad(int8), exact)
    lossy = grad(int8.model_copy(update={"min_ndim": 0}))  # the vector in int8, one scale: as it was
    assert (lossy - exact).norm() > 1e-3 * exact.norm()


def test_trls_fused_lm_head_keeps_what_it_recomputes_the_logits_from_exact():
    """TRL's SFTTrainer computes the loss with its fused LM head, which saves the hidden states
    (tokens x hidden; backward recomputes every logit from them) and per-token log_z and entropy
    (1-D). The vectors reach no compressor; the matrix, saved by the language model itself (kind
    ``lm``), is kept exact: in int8 it biased the whole gradient (SmolLM2 SFT through TRL ended at
    held-out loss 3.323 against 3.305 with it exact)."""
    trl_utils = pytest.importorskip("trl.trainer.utils")
    model = make_model("llama").train()
    trl_utils.add_fused_lm_head(model, outputs=("log_probs", "entropy"))
    engine = CompressionEngine(model, slimfit_policy(), compressors=FACTORIES).attach()
    chosen, pick = [], engine.compressor_for

    def spy(ctx):
        choice = pick(ctx)
        chosen.append((ctx.module_path, ctx.module_kind, ctx.shape, choice[0]))
        return choice

    engine.compressor_for = spy
    ids = torch.randint(0, 50, (8, 16), generator=torch.Generator().manual_seed(1))
    with engine.step():
        out = model(input_ids=ids, labels=ids, fused_lm_head=True)
        (-out.log_probs.sum()).backward()
    engine.detach()
    assert chosen and all(len(shape) >= 2 for _, _, shape, _ in chosen)
    saved_by_lm = [(shape, name) for path, kind, shape, name in chosen if path == ""]
    assert saved_by_lm and all(kind == "lm" for path, kind, _, _ in chosen if path == "")
    assert all(len(shape) == 2 and shape[-1] == 32 and name == "none" for shape, name in saved_by_lm), saved_by_lm
    assert any(name == "int8" for path, _, _, name in chosen if path != "")  # the layers' tensors still packed
