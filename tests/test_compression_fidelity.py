"""Gradient fidelity on a small BERT with 90% of its units frozen (the issue's acceptance bar).

Units as in SlimFit: every weight with more than one dimension plus each LayerNorm scale; biases
and LayerNorm shifts always train. A trained unit counts when its exact gradient is not
negligible (norm above 1e-6 times the largest), which drops the key bias (its exact gradient is
zero up to rounding: softmax is invariant to it) by the norm rule, not by name.
"""

from __future__ import annotations

import pytest
import torch

from slimfit_accel.compression import installed_compressor_factories, CompressionPolicy, Rule, compressed_activations, slimfit_policy
from slimfit_accel.compression.policy import ATTENTION_TYPES, FFN_DOWN_PATHS, GELU_TYPES

transformers = pytest.importorskip("transformers")

FACTORIES = installed_compressor_factories()  # the built-ins, through the real plugin registry
SEEDS = (0, 1, 2)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    cfg = transformers.BertConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=256,
                                  vocab_size=200, max_position_embeddings=64, attn_implementation="eager")
    return transformers.BertForSequenceClassification(cfg).train()


def freeze_90_percent(model, seed):
    units = [n for n, p in model.named_parameters() if p.dim() > 1 or n.endswith("LayerNorm.weight")]
    order = torch.randperm(len(units), generator=torch.Generator().manual_seed(seed)).tolist()
    frozen = {units[i] for i in order[: int(0.9 * len(units))]}
    for name, p in model.named_parameters():
        p.requires_grad_(name not in frozen)


def gradients(model, policy=None, autocast=False):
    model.zero_grad(set_to_none=True)
    g = torch.Generator().manual_seed(123)
    ids, labels = torch.randint(0, 200, (8, 32), generator=g), torch.randint(0, 2, (8,), generator=g)
    torch.manual_seed(7)  # same dropout masks in every run: compression never changes the forward
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        if policy is None:
            loss = model(input_ids=ids, labels=labels).loss
        else:
            with compressed_activations(model, policy, compressors=FACTORIES):
                loss = model(input_ids=ids, labels=labels).loss
    loss.backward()
    return {n: p.grad.float().clone() for n, p in model.named_parameters() if p.grad is not None}


def cosines(exact, approx):
    largest = max(g.norm() for g in exact.values())
    return {n: torch.nn.functional.cosine_similarity(g.flatten(), approx[n].flatten(), dim=0).item()
            for n, g in exact.items() if g.norm() > 1e-6 * largest}


def relative_error(exact, approx):
    num = sum((exact[n] - approx[n]).pow(2).sum() for n in exact)
    return (num / sum(g.pow(2).sum() for g in exact.values())).sqrt().item()


def only(gelu=None, eight_bit=None):
    """A policy compressing just the GELU inputs, or just SlimFit's 8-bit tensors."""
    rules = []
    if gelu:
        rules.append(Rule(module_type=GELU_TYPES, compressor=gelu))
    if eight_bit:
        attention, ffn_down = eight_bit
        rules.append(Rule(module_type=ATTENTION_TYPES, compressor=attention))
        rules.append(Rule(path=FFN_DOWN_PATHS, exclude="*attention*", compressor=ffn_down))
    return CompressionPolicy(rules=rules)


@pytest.mark.parametrize("seed", SEEDS)
def test_scaled_formats_err_no_more_than_the_reference_fixed_point(model, seed):
    freeze_90_percent(model, seed)
    exact = gradients(model)
    scaled8 = relative_error(exact, gradients(model, only(eight_bit=({"name": "int8"}, {"name": "int8"}))))
    fixed8 = relative_error(exact, gradients(model, only(eight_bit=(
        {"name": "slimfit_attention"}, {"name": "fixed_point", "bits": 8, "step": 1 / 16}))))
    assert scaled8 <= fixed8
    scaled4 = relative_error(exact, gradients(model, only(gelu={"name": "int4"})))
    fixed4 = relative_error(exact, gradients(model, only(gelu={"name": "fixed_point", "bits": 4, "step": 0.5})))
    assert scaled4 <= fixed4


@pytest.mark.parametrize("seed", SEEDS)
def test_default_policy_keeps_trained_units_close_to_exact(model, seed):
    freeze_90_percent(model, seed)
    exact = gradients(model)
    cos = cosines(exact, gradients(model, slimfit_policy()))
    assert len(cos) < len(exact)  # the key biases fall under the norm rule
    assert min(cos.values()) >= 0.95, min(cos.items(), key=lambda kv: kv[1])
    assert sum(cos.values()) / len(cos) >= 0.98


def test_bf16_autocast_with_compression_is_close_to_fp32_with_compression(model):
    freeze_90_percent(model, 0)
    fp32 = gradients(model, slimfit_policy())
    bf16 = gradients(model, slimfit_policy(), autocast=True)
    cos = cosines(fp32, bf16)
    assert min(cos.values()) >= 0.98 and sum(cos.values()) / len(cos) >= 0.995
