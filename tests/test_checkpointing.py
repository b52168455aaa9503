"""Frozen-aware activation checkpointing composed with SlimFit freezing and compression."""

from __future__ import annotations

import copy
import io

import pytest
import torch

from slimfit_accel import SlimFit
from slimfit_accel.checkpointing import select_blocks
from slimfit_accel.errors import ConfigError

transformers = pytest.importorskip("transformers")

from test_compression_architectures import batch, build  # noqa: E402


def one_step(arch: str, checkpointing: dict | None, compression: str = "none", steps: int = 3):
    """Gradients of the last of ``steps`` SlimFit steps (90% frozen), the model and the report."""
    model = build(arch)
    config = {"scheduler": {"name": "ils", "freeze_ratio": 0.9}, "compression": compression, "memory_meter": "always"}
    if checkpointing is not None:
        config["checkpointing"] = checkpointing
    slimfit = SlimFit.from_config(config)
    model = slimfit.prepare_model(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)  # weights stay put: same decisions in every run
    slimfit.attach(None, model, optimizer)
    for step in range(steps):
        with slimfit.step():
            torch.manual_seed(step)  # same dropout masks with and without recomputation
            model(**batch(arch)).loss.backward()
            grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
            frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    recomputed = slimfit.checkpointing.recomputations if slimfit.checkpointing is not None else 0
    report = slimfit.report().memory
    slimfit.detach()
    return grads, frozen, recomputed, report


@pytest.mark.parametrize("arch", ["bert", "llama", "t5"])
def test_checkpointed_gradients_equal_the_plain_ones_and_frozen_units_get_none(arch):
    plain, frozen, _, plain_mem = one_step(arch, None)
    ckpt, frozen_ckpt, recomputed, ckpt_mem = one_step(arch, {"blocks": "all"})
    assert recomputed > 0 and frozen == frozen_ckpt and frozen
    assert plain.keys() == ckpt.keys() and not (frozen & ckpt.keys())
    for name, grad in plain.items():
        torch.testing.assert_close(ckpt[name], grad, rtol=1e-5, atol=1e-6, msg=name)
    assert ckpt_mem.peak.activations < plain_mem.peak.activations


def test_checkpointing_with_compression_stays_close_and_stores_less():
    exact, _, _, plain_mem = one_step("llama", None)
    approx, _, _, mem = one_step("llama", {"blocks": "all"}, compression="slimfit")
    _, _, _, compressed_mem = one_step("llama", None, compression="slimfit")
    largest = max(g.norm() for g in exact.values())
    cos = [torch.nn.functional.cosine_similarity(g.flatten(), approx[n].flatten(), dim=0).item()
           for n, g in exact.items() if g.norm() > 1e-6 * largest]
    assert min(cos) >= 0.95 and sum(cos) / len(cos) >= 0.98
    assert mem.peak.activations < plain_mem.peak.activations and compressed_mem.peak.activations < plain_mem.peak.activations
    # the block inputs are stored as int8 (a quarter); what is recomputed is counted while alive
    assert "recomputed" in mem.by_compressor and mem.by_compressor["int8"][1] * 3.5 < mem.by_compressor["int8"][0]


@pytest.mark.parametrize("arch", ["llama", "bert"])
def test_an_exact_block_input_is_kept_as_it_is(arch):
    """``input: exact``: under compression the checkpointed blocks keep their input as it is (the
    recomputation saves what it recomputes uncompressed either way), so their gradients come out
    closer to the uncompressed run's than from an int8 input, for more stored bytes."""
    reference, _, _, _ = one_step(arch, None)
    exact, _, recomputed, exact_mem = one_step(arch, {"blocks": "all", "input": "exact"}, compression="slimfit")
    rounded, _, _, rounded_mem = one_step(arch, {"blocks": "all"}, compression="slimfit")
    assert recomputed > 0 and reference.keys() == exact.keys() == rounded.keys()

    def error(grads):
        return sum(float((grads[n] - g).norm() ** 2) for n, g in reference.items())

    assert 0 < error(exact) < error(rounded)
    # the block inputs: kept as they are (counted with the exact tensors, "-"), not as int8
    exact_int8, rounded_int8 = exact_mem.by_compressor.get("int8", [0, 0])[0], rounded_mem.by_compressor["int8"][0]
    assert exact_int8 < rounded_int8 and exact_mem.by_compressor["-"][0] - rounded_mem.by_compressor["-"][0] == rounded_int8 - exact_int8
    assert exact_mem.peak.activations > rounded_mem.peak.activations


def test_blocks_by_count_and_index():
    paths = [f"layer.{i}" for i in range(4)]
    assert select_blocks(paths, "all") == paths and select_blocks(paths, 2) == paths[:2]
    assert select_blocks(paths, [3, -4]) == ["layer.0", "layer.3"]
    with pytest.raises(ConfigError, match=r"out of range.*4 blocks"):
        select_blocks(paths, [4])
    for count in (0, -1):  # a count, not an index: never an empty selection
        with pytest.raises(ConfigError, match=rf"checkpointing.blocks: {count} is a count.*\[{count}\]"):
            select_blocks(paths, count)
        with pytest.raises(ConfigError, match=rf"checkpointing.blocks.*{count} is a count"):  # already when loaded
            SlimFit.from_config({"checkpointing": {"blocks": count}})


def attached_llama(checkpointing: bool = True) -> tuple[SlimFit, torch.nn.Module]:
    """A tiny Llama with SlimFit attached: compression (norm and gated-MLP swaps, the engine's
    hooks) and, if asked, every block checkpointed."""
    config = {"scheduler": {"name": "ils", "freeze_ratio": 0.5}, "compression": "slimfit"}
    if checkpointing:
        config["checkpointing"] = {"blocks": "all"}
    slimfit = SlimFit.from_config(config)
    model = slimfit.prepare_model(build("llama").eval())  # eval: no dropout, every forward the same
    slimfit.attach(None, model, torch.optim.SGD(model.parameters(), lr=0.0))
    return slimfit, model


def logits_and_grads(model: torch.nn.Module) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One forward and backward outside a SlimFit step: exact (nothing frozen or compressed),
    through the checkpointed blocks and the swapped modules."""
    model.zero_grad(set_to_none=True)
    out = model(**batch("llama"))
    out.loss.backward()
    return out.logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_same(got: tuple, want: tuple) -> None:
    torch.testing.assert_close(got[0], want[0], rtol=1e-6, atol=1e-6)
    assert got[1].keys() == want[1].keys() and got[1]
    for name, grad in want[1].items():
        torch.testing.assert_close(got[1][name], grad, rtol=1e-4, atol=1e-5, msg=name)  # the swapped backward rounds otherwise


def patched(model: torch.nn.Module) -> set[str]:
    return {name for name, module in model.named_modules() if "forward" in module.__dict__}


@pytest.mark.parametrize("checkpointing", [True, False])
def test_a_deep_copy_runs_its_own_weights(checkpointing):
    slimfit, model = attached_llama(checkpointing)
    twin = copy.deepcopy(model)
    assert patched(twin) == patched(model) and patched(model)  # the copy keeps the swaps and checkpointing
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for param in twin.parameters():
            param.add_(0.5 * torch.randn(param.shape, generator=generator))
    fresh = build("llama").eval()
    fresh.load_state_dict(twin.state_dict())
    recomputed = slimfit.checkpointing.recomputations if checkpointing else 0
    got, original = logits_and_grads(twin), logits_and_grads(model)
    assert not torch.allclose(got[0], original[0], atol=1e-2)
    assert_same(got, logits_and_grads(fresh))
    if checkpointing:  # the original's recomputations only: the copy is not part of this SlimFit
        assert slimfit.checkpointing.recomputations == recomputed + len(model.model.layers)
    slimfit.detach()
    assert not patched(model) and patched(twin)


@pytest.mark.parametrize("checkpointing", [True, False])
def test_torch_save_and_load_of_an_attached_model(checkpointing):
    slimfit, model = attached_llama(checkpointing)
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    assert patched(loaded) == patched(model)
    assert not {id(p) for p in loaded.parameters()} & {id(p) for p in model.parameters()}
    assert_same(logits_and_grads(loaded), logits_and_grads(model))
    with torch.no_grad():
        loaded.model.norm.weight.add_(1.0)
        loaded.model.layers[0].mlp.up_proj.weight.mul_(2.0)
    fresh = build("llama").eval()
    fresh.load_state_dict(loaded.state_dict())
    assert_same(logits_and_grads(loaded), logits_and_grads(fresh))
    slimfit.detach()
    assert not patched(model) and patched(loaded)


def test_transformers_gradient_checkpointing_on_leaves_the_key_unapplied_with_a_warning():
    """A model already checkpointed by transformers (TRL's ``gradient_checkpointing=True`` with the
    decoder default, which checkpoints its first blocks) is not checkpointed twice."""
    model = build("llama")
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    slimfit = SlimFit.from_config({"scheduler": {"name": "ils", "freeze_ratio": 0.5}, "checkpointing": {"blocks": 1}})
    model = slimfit.prepare_model(model)
    model.train()
    with pytest.warns(UserWarning, match="gradient checkpointing on.*not applied"):
        slimfit.attach(None, model, torch.optim.SGD(model.parameters(), lr=0.01))
    assert slimfit.checkpointing is None and not any(hasattr(m, "_slimfit_checkpointing") for m in model.modules())
    with slimfit.step():
        model(**batch("llama")).loss.backward()
    slimfit.detach()
