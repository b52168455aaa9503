"""The chunked causal-LM loss equals transformers' standard loss and gradients, and the full
batch x length x vocab logits are never created (an allocation probe over every op)."""

from __future__ import annotations

import copy
import io

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from slimfit_accel import ConfigError, IntegrationError, SlimFit
from slimfit_accel.chunked_loss import (
    chunked_linear_cross_entropy,
    chunked_loss_enabled,
    disable_chunked_loss,
    enable_chunked_loss,
)
from slimfit_accel.compression import compressed_activations

VOCAB, HIDDEN = 1000, 32


def tiny_lm(tied: bool = False, dtype: torch.dtype = torch.float32, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=tied,
    )
    return LlamaForCausalLM(config).to(dtype)


def lm_batch(batch: int = 2, length: int = 13, seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (batch, length), generator=generator)
    labels = ids.clone()
    labels[0, :4] = -100  # a prompt that is not trained on
    mask = torch.ones_like(ids)
    mask[-1, -3:] = 0  # right padding
    labels[-1, -3:] = -100
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def standard_and_chunked(tied: bool = False, dtype: torch.dtype = torch.float32, chunk_size: int = 7):
    model = tiny_lm(tied, dtype)
    return model, enable_chunked_loss(copy.deepcopy(model), chunk_size=chunk_size)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30)).item()


def grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.grad for name, p in model.named_parameters() if p.grad is not None}


def assert_same_grads(chunked: torch.nn.Module, standard: torch.nn.Module, tol: float) -> None:
    want, got = grads(standard), grads(chunked)
    assert want.keys() == got.keys() and want
    worst = max((rel_err(got[name], want[name]), name) for name in want)
    assert worst[0] <= tol, worst


class LargestTensor(TorchDispatchMode):
    """Records every tensor any op creates (forward and backward): the largest, and shapes."""

    def __init__(self):
        super().__init__()
        self.largest = 0
        self.shapes: set[tuple[int, ...]] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for leaf in tree_leaves(out):
            if isinstance(leaf, torch.Tensor):
                self.largest = max(self.largest, leaf.numel())
                self.shapes.add(tuple(leaf.shape))
        return out


# ---------------------------------------------------------------- exactness through the model
@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_loss_and_every_gradient_equal_the_standard_path_fp32(tied):
    standard, chunked = standard_and_chunked(tied, chunk_size=7)  # 26 tokens: 7 does not divide them
    batch = lm_batch()
    want = standard(**batch)
    got = chunked(**batch)
    want.loss.backward()
    got.loss.backward()
    assert got.logits is None and want.logits is not None
    assert abs(got.loss.item() - want.loss.item()) <= 1e-5 * abs(want.loss.item())
    assert_same_grads(chunked, standard, 1e-5)
    if tied:
        assert chunked.lm_head.weight is chunked.model.embed_tokens.weight


@pytest.mark.parametrize("autocast", [False, True], ids=["bf16-weights", "fp32-weights-bf16-autocast"])
def test_bf16_matches_the_standard_path_to_bf16_rounding(autocast):
    dtype = torch.float32 if autocast else torch.bfloat16
    standard, chunked = standard_and_chunked(dtype=dtype, chunk_size=5)
    batch = lm_batch()
    losses = []
    for model in (standard, chunked):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = model(**batch).loss
        loss.backward()
        losses.append(loss)
    assert losses[1].dtype == losses[0].dtype == torch.float32
    assert abs(losses[1].item() - losses[0].item()) <= 1e-5 * abs(losses[0].item())  # same bf16 logits, fp32 sums
    # The head's gradient is a sum of per-chunk bf16 products instead of one: bf16 rounding apart.
    assert_same_grads(chunked, standard, 2e-2)
    cosine = F.cosine_similarity(chunked.lm_head.weight.grad.float().flatten(), standard.lm_head.weight.grad.float().flatten(), 0)
    assert cosine > 0.9999


def test_num_items_in_batch_divides_the_sum_as_transformers_does():
    standard, chunked = standard_and_chunked(chunk_size=4)
    batch = lm_batch()
    count = torch.tensor(40)  # tokens of the whole accumulated batch, as the Trainer passes it
    want = standard(**batch, num_items_in_batch=count)
    got = chunked(**batch, num_items_in_batch=count)
    want.loss.backward()
    got.loss.backward()
    assert abs(got.loss.item() - want.loss.item()) <= 1e-5 * abs(want.loss.item())
    assert_same_grads(chunked, standard, 1e-5)


def test_frozen_head_gets_no_weight_gradient_and_the_same_input_gradients():
    standard, chunked = standard_and_chunked(chunk_size=8)
    for model in (standard, chunked):
        model.lm_head.weight.requires_grad_(False)
        model.model.embed_tokens.weight.requires_grad_(False)  # its gradient has the head's shape too
    batch = lm_batch()
    standard(**batch).loss.backward()
    with LargestTensor() as probe:
        chunked(**batch).loss.backward()
    assert chunked.lm_head.weight.grad is None
    assert (VOCAB, HIDDEN) not in probe.shapes  # no weight gradient was computed, even per chunk
    assert_same_grads(chunked, standard, 1e-5)
    with LargestTensor() as trained:  # the probe does see one when the head trains
        chunked.lm_head.weight.requires_grad_(True)
        chunked(**batch).loss.backward()
    assert (VOCAB, HIDDEN) in trained.shapes


@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16-autocast"])
def test_a_frozen_head_takes_its_input_gradient_in_forward_and_backward_recomputes_no_logits(autocast):
    standard, chunked = standard_and_chunked(chunk_size=8)
    for model in (standard, chunked):
        model.lm_head.weight.requires_grad_(False)
    batch = lm_batch(batch=3)
    count = torch.tensor(31)
    losses = []
    for model in (standard, chunked):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast), LargestTensor() as forward:
            loss = model(**batch, num_items_in_batch=count).loss
        with LargestTensor() as backward:
            (2.5 * loss).backward()  # a scaled loss (accumulation, fp16 loss scaling) scales the saved gradient
        losses.append(loss)
    assert any(VOCAB in shape for shape in forward.shapes)  # the logits, a chunk at a time, in forward ...
    logits_like = [shape for shape in backward.shapes if VOCAB in shape and shape != (VOCAB, HIDDEN)]  # not the embeddings' gradient
    assert not logits_like, logits_like  # ... and never again
    assert abs(losses[1].item() - losses[0].item()) <= 1e-5 * abs(losses[0].item())
    assert_same_grads(chunked, standard, 2e-2 if autocast else 1e-5)


def test_the_gradient_computed_in_forward_is_kept_exact_and_counted_by_the_engine():
    _, chunked = standard_and_chunked(chunk_size=8)
    chunked.lm_head.weight.requires_grad_(False)
    exact = copy.deepcopy(chunked)
    batch = lm_batch(batch=4, length=16)
    exact(**batch).loss.backward()
    with compressed_activations(chunked) as engine:
        chunked(**batch).loss.backward()
    # tokens x hidden fp32 kept as it is (a policy that packed it would make every gradient lossy)
    assert engine.stats.by_compressor["-"][1] >= 4 * 16 * HIDDEN * 4
    cosine = F.cosine_similarity(chunked.model.norm.weight.grad, exact.model.norm.weight.grad, 0).item()
    assert cosine > 0.99999, cosine


def test_shift_labels_and_logits_to_keep_follow_the_model():
    standard, chunked = standard_and_chunked(chunk_size=3)
    batch = lm_batch()
    keep = 5
    shift = batch["labels"][:, -keep:].roll(-1, dims=1)
    shift[:, -1] = -100
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    want = standard(**inputs, labels=batch["labels"], shift_labels=shift, logits_to_keep=keep)
    got = chunked(**inputs, labels=batch["labels"], shift_labels=shift, logits_to_keep=keep)
    assert abs(got.loss.item() - want.loss.item()) <= 1e-5 * abs(want.loss.item())
    with pytest.raises(ValueError, match="batch_size"):  # labels longer than the kept logits: both refuse
        chunked(**inputs, labels=batch["labels"], logits_to_keep=keep)
    with pytest.raises(ValueError, match="batch_size"):
        standard(**inputs, labels=batch["labels"], logits_to_keep=keep)


def test_without_labels_or_gradients_the_model_runs_unchanged():
    standard, chunked = standard_and_chunked()
    batch = lm_batch()
    plain = {k: v for k, v in batch.items() if k != "labels"}
    torch.testing.assert_close(chunked(**plain).logits, standard(**plain).logits)
    with torch.no_grad():  # evaluation: the logits are there for metrics
        got, want = chunked(**batch), standard(**batch)
    torch.testing.assert_close(got.logits, want.logits)
    torch.testing.assert_close(got.loss, want.loss)
    assert chunked(**batch, return_dict=False)[0].ndim == 0  # a tuple: (loss, cache...) without logits


# ---------------------------------------------------------------- the function itself
@pytest.mark.parametrize("chunk_size", [1, 5, 64, 4096])
def test_function_matches_cross_entropy_with_bias_ignore_index_and_num_items(chunk_size):
    generator = torch.Generator().manual_seed(1)
    hidden = torch.randn(3, 11, 16, generator=generator, requires_grad=True)
    weight = torch.randn(50, 16, generator=generator, requires_grad=True)
    bias = torch.randn(50, generator=generator, requires_grad=True)
    labels = torch.randint(0, 50, (3, 11), generator=generator)
    labels[1] = 7
    labels[labels == 7] = -1  # a custom ignore_index
    for num_items in (None, 25):
        reduction = "mean" if num_items is None else "sum"
        want = F.cross_entropy(F.linear(hidden, weight, bias).float().view(-1, 50), labels.view(-1), ignore_index=-1, reduction=reduction)
        want = want if num_items is None else want / num_items
        got = chunked_linear_cross_entropy(hidden, weight, bias, labels, ignore_index=-1, num_items_in_batch=num_items, chunk_size=chunk_size)
        expected = torch.autograd.grad(want, (hidden, weight, bias))
        actual = torch.autograd.grad(got, (hidden, weight, bias))
        assert abs(got.item() - want.item()) <= 1e-5 * abs(want.item())
        for a, e in zip(actual, expected):
            assert rel_err(a, e) <= 1e-5


def test_function_refuses_labels_of_another_length():
    with pytest.raises(ValueError, match="batch_size"):
        chunked_linear_cross_entropy(torch.randn(2, 4, 8), torch.randn(10, 8), None, torch.zeros(2, 5, dtype=torch.long))


# ---------------------------------------------------------------- memory
def test_the_full_logits_never_exist_in_forward_or_backward():
    batch = lm_batch(batch=4, length=16)  # 64 tokens x 1000 words > the 1000 x 32 weight
    full = 4 * 16 * VOCAB
    standard, chunked = standard_and_chunked(chunk_size=16)
    with LargestTensor() as probe:
        standard(**batch).loss.backward()
    assert probe.largest >= full  # the probe sees the standard path's logits
    with LargestTensor() as probe:
        loss = chunked(**batch).loss
        loss.backward()
    assert probe.largest < full, probe.largest
    per_token = [torch.Size(s).numel() for s in probe.shapes if VOCAB in s and s not in ((VOCAB, HIDDEN), (HIDDEN, VOCAB))]
    assert max(per_token) == 16 * VOCAB  # one chunk's logits at a time


def test_default_compression_packs_the_hidden_states_and_keeps_gradients_close():
    """Inside SlimFit's default policy the saved hidden states are packed (int8, as the standard
    path packs the head's input); the log-softmax over the vocabulary is never saved at all."""
    batch = lm_batch(batch=4, length=16)
    exact, chunked = standard_and_chunked(chunk_size=16)
    exact(**batch).loss.backward()
    standard = copy.deepcopy(exact)
    standard.zero_grad()
    with compressed_activations(chunked) as engine:
        chunked(**batch).loss.backward()
    with compressed_activations(standard) as reference:
        standard(**batch).loss.backward()
    assert reference.stats.raw_bytes - engine.stats.raw_bytes >= 0.99 * 4 * 16 * VOCAB * 4  # no fp32 log-probs saved
    assert engine.stats.packed_bytes < engine.stats.raw_bytes  # the hidden states were packed too
    # The chunked loss loses nothing the standard path keeps under the same policy (the rest of
    # the model's gradients move with the policy's other formats, on both paths alike) ...
    want, same_policy = grads(exact), grads(standard)
    for name, grad in grads(chunked).items():
        cosine = F.cosine_similarity(grad.flatten(), same_policy[name].flatten(), 0).item()
        assert cosine > 0.999, (name, cosine)
    # ... and the gradients it computes from the packed hidden states stay close to exact ones.
    for name in ("lm_head.weight", "model.norm.weight"):
        cosine = F.cosine_similarity(chunked.get_parameter(name).grad.flatten(), want[name].flatten(), 0).item()
        assert cosine > 0.999, (name, cosine)


# ---------------------------------------------------------------- patching, copies, refusals
def test_copies_run_their_own_weights_and_pickle():
    _, chunked = standard_and_chunked()
    batch = lm_batch()
    twin = copy.deepcopy(chunked)
    with torch.no_grad():
        twin.lm_head.weight.mul_(2)
    assert chunked_loss_enabled(twin) and twin(**batch).logits is None
    assert twin(**batch).loss.item() != pytest.approx(chunked(**batch).loss.item())
    buffer = io.BytesIO()
    torch.save(chunked, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    torch.testing.assert_close(loaded(**batch).loss, chunked(**batch).loss)
    disable_chunked_loss(chunked)
    assert "forward" not in chunked.__dict__ and "forward" not in chunked.lm_head.__dict__
    assert chunked(**batch).logits is not None and twin(**batch).logits is None


def _gemma2(softcapping):
    from transformers import Gemma2Config, Gemma2ForCausalLM

    torch.manual_seed(0)
    return Gemma2ForCausalLM(Gemma2Config(vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                          num_attention_heads=2, num_key_value_heads=1, head_dim=8,
                                          final_logit_softcapping=softcapping))


def test_a_model_that_changes_its_logits_before_the_loss_is_refused_before_training():
    with pytest.raises(ConfigError, match="final_logit_softcapping=30.0"):
        enable_chunked_loss(_gemma2(30.0))
    with pytest.raises(ConfigError, match="set it to auto"):
        SlimFit.from_config({"chunked_loss": True}).prepare_model(_gemma2(30.0))


def test_a_transform_no_config_announces_fails_loudly_at_the_first_forward():
    model = enable_chunked_loss(_gemma2(None))
    model.config.final_logit_softcapping = 30.0  # set after the check: the forward still catches it
    with pytest.raises(IntegrationError, match="soft-capping"):
        model(**lm_batch())


def test_auto_keeps_the_standard_loss_where_the_chunked_one_does_not_apply(bert):
    config = SlimFit.from_config({"chunked_loss": "auto"}).config.chunked_loss
    assert config.fallback == "standard" and config.chunk_size > 0
    with pytest.raises(ConfigError, match="true, false, auto"):
        SlimFit.from_config({"chunked_loss": "autoo"})
    model, reference = _gemma2(30.0), _gemma2(30.0)
    with pytest.warns(UserWarning, match="final_logit_softcapping.*standard way"):
        SlimFit.from_config({"chunked_loss": "auto"}).prepare_model(model)
    assert not chunked_loss_enabled(model)
    batch = lm_batch()
    out = model(**batch)
    assert out.logits is not None
    torch.testing.assert_close(out.loss, reference(**batch).loss, rtol=0, atol=0)
    with pytest.warns(UserWarning, match="not a causal LM"):
        SlimFit.from_config({"chunked_loss": "auto"}).prepare_model(bert)
    lm = tiny_lm()
    SlimFit.from_config({"chunked_loss": "auto"}).prepare_model(lm)  # a model it covers: on, no warning
    assert chunked_loss_enabled(lm)


def test_refused_on_a_model_that_is_not_a_causal_lm(bert):
    with pytest.raises(ConfigError, match="not a causal LM"):
        enable_chunked_loss(bert)
    with pytest.raises(ConfigError, match="chunk_size"):
        enable_chunked_loss(tiny_lm(), chunk_size=0)


# ---------------------------------------------------------------- through SlimFit
def test_slimfit_config_key_applies_it_and_detach_restores_the_model(bert):
    model = tiny_lm(tied=True)
    reference = copy.deepcopy(model)
    slimfit = SlimFit.from_config({"compression": "none", "chunked_loss": {"chunk_size": 8}, "scheduler": {"name": "ils", "freeze_ratio": 0.5}})
    slimfit.prepare_model(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    slimfit.attach(None, model, optimizer, total_steps=2)
    batch = lm_batch()
    with slimfit.step():
        out = model(**batch)
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    assert out.logits is None
    torch.testing.assert_close(out.loss, reference(**batch).loss, rtol=1e-5, atol=0)
    slimfit.detach()
    assert not chunked_loss_enabled(model) and model(**batch).logits is not None
    assert SlimFit.from_config({"chunked_loss": True}).config.chunked_loss.chunk_size > 0
    assert SlimFit.from_config({"chunked_loss": False}).config.chunked_loss is None
    with pytest.raises(ConfigError, match="not a causal LM"):
        SlimFit.from_config({"chunked_loss": True}).prepare_model(bert)


def test_the_config_default_chunk_size_is_the_functions():
    from slimfit_accel.chunked_loss import DEFAULT_CHUNK_SIZE
    from slimfit_accel.config import ChunkedLossConfig

    assert ChunkedLossConfig().chunk_size == DEFAULT_CHUNK_SIZE
