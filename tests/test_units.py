"""Unit discovery on BERT, ViT, GPT-2 and Llama-style models (tiny random configs)."""

from __future__ import annotations

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, ViTConfig, ViTForImageClassification

from slimfit_accel import ConfigError, UnitsConfig
from slimfit_accel.units import discover_units, find_blocks

from conftest import tiny_bert


def tiny_vit():
    config = ViTConfig(image_size=16, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, num_labels=3)
    return ViTForImageClassification(config)


def tiny_gpt2():
    return GPT2LMHeadModel(GPT2Config(vocab_size=50, n_positions=16, n_embd=32, n_layer=2, n_head=2))


def tiny_llama():
    config = LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=16)
    return LlamaForCausalLM(config)


def test_tensor_units_follow_slimfit_rule_on_bert():
    model = tiny_bert()
    units = discover_units(model, UnitsConfig())
    names = [u.name for u in units.all]
    # every >1-D weight and every LayerNorm scale; no bias, no LayerNorm shift
    expected = [n for n, p in model.named_parameters() if p.dim() > 1 or n.endswith("LayerNorm.weight")]
    assert names == expected
    assert not any(n.endswith(".bias") for n in names)
    # 3 embeddings + LN, per layer Q,K,V,O,LN,up,down,LN (8) x2, pooler, classifier
    assert len(names) == 4 + 16 + 2
    assert [u.index for u in units.all] == list(range(len(names)))


def test_blocks_found_structurally_on_every_family():
    assert find_blocks(tiny_bert()) == ["bert.encoder.layer.0", "bert.encoder.layer.1"]
    vit = tiny_vit()
    stack = next(path for path, m in vit.named_modules() if isinstance(m, torch.nn.ModuleList))
    assert find_blocks(vit) == [f"{stack}.0", f"{stack}.1"]
    assert find_blocks(tiny_gpt2()) == ["transformer.h.0", "transformer.h.1"]
    assert find_blocks(tiny_llama()) == ["model.layers.0", "model.layers.1"]


@pytest.mark.parametrize("factory", [tiny_vit, tiny_gpt2, tiny_llama])
def test_tensor_units_on_vit_and_decoders(factory):
    model = factory()
    units = discover_units(model, UnitsConfig())
    params = dict(model.named_parameters())
    for unit in units.all:
        (name,) = unit.param_names
        owner = model.get_submodule(name.rpartition(".")[0])
        assert params[name].dim() > 1 or "norm" in type(owner).__name__.lower()
    biases = [n for n, p in params.items() if p.dim() == 1 and n.endswith("bias")]
    assert biases == [] or not set(biases) & {n for u in units.all for n in u.param_names}
    blocks = {u.block for u in units.all}
    assert blocks == {None, 0, 1}


def test_vit_cls_and_position_tensors_are_units():
    names = {u.name for u in discover_units(tiny_vit(), UnitsConfig()).all}
    assert {"vit.embeddings.cls_token", "vit.embeddings.position_embeddings", "vit.embeddings.patch_embeddings.projection.weight"} <= names


def test_tied_gpt2_head_is_one_unit():
    model = tiny_gpt2()
    assert model.lm_head.weight is model.transformer.wte.weight
    units = discover_units(model, UnitsConfig())
    tied = [u for u in units.all if any(p is model.lm_head.weight for p in u.params)]
    assert len(tied) == 1


def test_module_and_block_granularity():
    model = tiny_bert()
    modules = discover_units(model, UnitsConfig(granularity="module", freeze_biases=True))
    query = next(u for u in modules.all if u.name == "bert.encoder.layer.0.attention.self.query")
    assert query.param_names == ("bert.encoder.layer.0.attention.self.query.weight", "bert.encoder.layer.0.attention.self.query.bias")
    blocks = discover_units(model, UnitsConfig(granularity="block", always_train=["classifier.*"]))
    assert [u.name for u in blocks.schedulable] == [
        "bert.embeddings.word_embeddings", "bert.embeddings.position_embeddings",
        "bert.embeddings.token_type_embeddings", "bert.embeddings.LayerNorm",
        "bert.encoder.layer.0", "bert.encoder.layer.1", "bert.pooler.dense",
    ]
    assert [u.name for u in blocks.always_trained] == ["classifier"]
    layer0 = blocks.schedulable[4]
    assert layer0.block == 0 and len(layer0.params) == 8


def test_include_exclude_and_always_train():
    model = tiny_bert()
    units = discover_units(model, UnitsConfig(include=["bert.encoder.*", "classifier.*"], exclude=["*.LayerNorm.*"], always_train=["classifier.*"]))
    names = [u.name for u in units.all]
    assert all(n.startswith("bert.encoder.") or n.startswith("classifier.") for n in names)
    assert not any("LayerNorm" in n for n in names)
    assert [u.name for u in units.always_trained] == ["classifier.weight"]


@pytest.mark.parametrize("key", ["include", "exclude", "always_train"])
def test_pattern_matching_nothing_is_an_error(key):
    with pytest.raises(ConfigError, match=rf"units\.{key}: pattern 'nothing\.\*' matches no"):
        discover_units(tiny_bert(), UnitsConfig(**{key: ["nothing.*"]}))


def test_always_train_everything_is_an_error():
    with pytest.raises(ConfigError, match="nothing is left for the scheduler"):
        discover_units(tiny_bert(), UnitsConfig(always_train=["*"]))


def test_meta_device_model_has_same_units():
    with torch.device("meta"):
        model = tiny_bert()
    assert len(discover_units(model, UnitsConfig()).all) == 22
