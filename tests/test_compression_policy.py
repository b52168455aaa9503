"""Compression policy: rule matching, YAML, the default SlimFit table, config errors."""

from __future__ import annotations

import pytest
import torch
import yaml
from pydantic import ValidationError

from slimfit_accel.compression import CompressionEngine, CompressionPolicy, Rule, slimfit_policy
from slimfit_accel.errors import ConfigError
from slimfit_accel.hookspecs import SavedTensorContext
from slimfit_accel.strategies.compression.int8 import Int8Scaled
from slimfit_accel.strategies.compression.none import NoCompression


def ctx(path="m", type_="Linear", role=None, frozen=False):
    return SavedTensorContext(path, type_, role, frozen, torch.float32, (2, 2))


def test_rules_match_on_type_path_role_and_frozen_first_match_wins():
    policy = CompressionPolicy.model_validate(
        yaml.safe_load(
            """
            rules:
              - {module_type: "*LayerNorm", role: normalized, when: frozen, compressor: {name: topk, keep: 0.2}}
              - {path: ["*.output.dense", "*.fc2"], exclude: "*attention*", compressor: {name: int8, group_size: 64}}
              - {module_type: "*Attention", compressor: {name: int8}}
            default: {name: none}
            """
        )
    )
    assert policy.select(ctx("a.LayerNorm", "LayerNorm", "normalized", True)).options == {"keep": 0.2}
    assert policy.select(ctx("a.LayerNorm", "LayerNorm", "normalized", False)).name == "none"
    assert policy.select(ctx("a.LayerNorm", "LayerNorm", None, True)).name == "none"  # role unknown
    assert policy.select(ctx("enc.layer.0.output.dense")).options == {"group_size": 64}
    assert policy.select(ctx("enc.layer.0.attention.output.dense")).name == "none"
    assert policy.select(ctx("enc.layer.0.attention.self", "BertSelfAttention")).name == "int8"


def test_default_policy_follows_the_slimfit_table():
    policy = slimfit_policy()
    pick = lambda *a: policy.select(ctx(*a))  # noqa: E731
    assert pick("enc.layer.0.intermediate.intermediate_act_fn", "GELUActivation").name == "int4"
    assert pick("h.0.mlp.act", "NewGELUActivation").name == "int4"
    attention = pick("enc.layer.0.attention.self", "BertSelfAttention")
    assert (attention.name, attention.options) == ("bitmask", {"fallback": "int8"})  # masks as bits
    assert pick("h.0.attn", "GPT2Attention") == attention
    assert pick("enc.layer.0.output.dropout", "Dropout").name == "bitmask"
    assert pick("enc.layer.0.output.LayerNorm", "LayerNorm", "normalized", True).name == "int4"
    # everything else, chiefly what trained layers keep: the int8 default
    assert policy.default.name == "int8"
    assert pick("enc.layer.0.output.LayerNorm", "LayerNorm", "normalized", False).name == "int8"
    assert pick("enc.layer.0.output.dense", "Linear", "input").name == "int8"  # FFN down, BERT/ViT
    assert pick("model.layers.0.mlp.down_proj", "Linear").name == "int8"  # Llama
    assert pick("h.0.mlp.c_proj", "Conv1D").name == "int8"  # GPT-2
    assert pick("enc.layer.0.attention.output.dense", "Linear", "input").options == {}  # the default, not a rule
    assert pick("enc.layer.0.intermediate.dense", "Linear", "input").name == "int8"
    assert pick("model.layers.0.mlp.down_proj", "Linear") is not policy.default


def test_default_policy_rules_on_what_modules_compute():
    policy = slimfit_policy()

    def pick(kind="", role=None, type_="X", frozen=True):
        return policy.select(SavedTensorContext("m", type_, role, frozen, torch.float32, (2, 2), kind))

    assert (pick("relu").name, pick("relu").options) == ("bitmask", {"sign": True})  # exact
    assert pick("activation").name == "int4"  # SiLU, Tanh, ... as GELU
    assert pick("mlp").name == "int8" and pick("ffn_down").name == "int8"
    assert pick("norm", "normalized").name == "int4" and pick("norm", "normalized", frozen=False).name == "int8"
    assert pick(role="log_probs").options == {"log_domain": True}
    assert pick(role="block_input").name == "int8"


def test_unknown_fields_and_bad_when_are_rejected():
    with pytest.raises(ValidationError):
        Rule.model_validate({"module_typ": "Linear", "compressor": {"name": "int8"}})
    with pytest.raises(ValidationError):
        Rule.model_validate({"when": "sometimes", "compressor": {"name": "int8"}})


def test_engine_names_unknown_compressors_and_bad_options():
    model = torch.nn.Linear(2, 2)
    factories = {"none": NoCompression, "int8": Int8Scaled}
    with pytest.raises(ConfigError, match="unknown compressor 'int3'.*int8, none"):
        CompressionEngine(model, CompressionPolicy(rules=[Rule(compressor={"name": "int3"})]), compressors=factories)
    with pytest.raises(ConfigError, match="'int8' with options"):
        CompressionEngine(model, CompressionPolicy(rules=[Rule(compressor={"name": "int8", "bits": 3})]), compressors=factories)
    with pytest.raises(ConfigError, match="group_size"):
        CompressionEngine(model, CompressionPolicy(rules=[Rule(compressor={"name": "int8", "group_size": 0})]), compressors=factories)


def test_installed_plugins_provide_every_builtin_compressor():
    from slimfit_accel.compression import installed_compressor_factories

    assert {"none", "int8", "int4", "fixed_point", "slimfit_attention", "topk", "bitmask"} <= set(installed_compressor_factories())
