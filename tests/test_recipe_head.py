"""``always_train: [head]`` finds each model's task head, whatever it is named."""

from __future__ import annotations

import pytest
from torch import nn

from slimfit_accel.config import UnitsConfig
from slimfit_accel.errors import ConfigError
from slimfit_accel.units import discover_units, head_patterns

from conftest import tiny_bert


def tiny_gpt2():
    from transformers import GPT2Config, GPT2ForSequenceClassification

    config = GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=50, n_positions=32, num_labels=2, eos_token_id=0, bos_token_id=0)
    return GPT2ForSequenceClassification(config)


def tiny_vit():
    from transformers import ViTConfig, ViTForImageClassification

    config = ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, image_size=28, patch_size=7, num_labels=3)
    return ViTForImageClassification(config)


@pytest.mark.parametrize(("build", "head"), [(tiny_bert, "classifier.weight"), (tiny_gpt2, "score.weight"), (tiny_vit, "classifier.weight")])
def test_head_is_resolved_per_model(build, head):
    units = discover_units(build(), UnitsConfig(always_train=["head"]))
    assert [u.name for u in units.always_trained] == [head]


def test_plain_module_head_is_its_last_child_with_parameters():
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4), nn.Linear(4, 2), nn.Dropout())
    assert head_patterns(model) == ["3.*"]


def test_a_module_without_parameters_has_no_head():
    with pytest.raises(ConfigError, match="'head' names the task head"):
        head_patterns(nn.ReLU())


def tiny_llama_lm():
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)
    return LlamaForCausalLM(config)


def test_a_language_models_output_embeddings_are_not_a_new_head():
    # The LM head is pretrained vocab x hidden: `head` leaves it to the scheduler, and says so.
    model = tiny_llama_lm()
    with pytest.warns(UserWarning, match="'head'.*lm_head.*pretrained output embeddings"):
        units = discover_units(model, UnitsConfig(always_train=["head"]))
    assert units.always_trained == ()
    assert "lm_head.weight" in {u.name for u in units.schedulable}
    # Naming it still trains it every step.
    units = discover_units(model, UnitsConfig(always_train=["lm_head.*"]))
    assert [u.name for u in units.always_trained] == ["lm_head.weight"]


@pytest.mark.parametrize("build", [tiny_bert, tiny_gpt2, tiny_vit, tiny_llama_lm])
def test_norms_names_every_norm_scale(build):
    model = build()
    norm_weights = {
        f"{path}.weight" for path, module in model.named_modules()
        if "norm" in type(module).__name__.lower() and getattr(module, "weight", None) is not None
    }
    units = discover_units(model, UnitsConfig(always_train=["norms"]))
    assert norm_weights and {u.name for u in units.always_trained} == norm_weights
    assert not norm_weights & {u.name for u in units.schedulable}


def test_norms_with_block_units_is_refused():
    with pytest.raises(ConfigError, match="'norms' with granularity 'block'"):
        discover_units(tiny_bert(), UnitsConfig(granularity="block", always_train=["norms"]))
