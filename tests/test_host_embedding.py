"""``input_embedding: host``: an input embedding the run never trains lives in host memory, looked
up there, only its rows copied to the device. Bit-identical to the embedding on the device (alone,
with master weights, the step in backward and checkpointing, and with int8 frozen weights); the
meter leaves it out of the device total and reports it apart; refused with the reason for an
embedding the run trains or one tied to the head (``auto``: on the device, with a warning);
``detach`` puts it back; checkpoints round-trip."""

from __future__ import annotations

import pytest
import torch

from mixed_precision_reference import LR, WEIGHT_DECAY, lm_batch, tiny_llama
from slimfit_accel import SlimFit
from slimfit_accel.errors import IntegrationError
from slimfit_accel.frozen_int8 import stored_weight
from slimfit_accel.host_embedding import HostEmbedding, is_on_host

VOCAB = 256  # embedding 256 x 32: more than a fifth of the model, so ILS at 0.8 can never pick it
BASE = {"scheduler": {"name": "ils", "freeze_ratio": 0.8, "budget": "parameters"}, "memory_meter": "always",
        "compression": "slimfit"}
BEST = {**BASE, "optimizer_paging": True, "master_weights": "host", "optimizer_step": "in_backward",
        "checkpointing": {"blocks": "all"}, "chunked_loss": True}


def model():
    return tiny_llama(vocab=VOCAB)


def start(config, build=model, freeze_embedding=False):
    slimfit = SlimFit.from_config(config)
    net = build()
    if freeze_embedding:
        net.get_input_embeddings().weight.requires_grad_(False)
    net = slimfit.prepare_model(net)
    optimizer = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=LR, weight_decay=WEIGHT_DECAY)
    slimfit.attach(None, net, optimizer)
    return slimfit, net, optimizer


def train(slimfit, net, optimizer, steps=4):
    for step in range(steps):
        with slimfit.step():
            net(**lm_batch(step, vocab=VOCAB)).loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)


def exact_state(slimfit, net) -> dict[str, torch.Tensor]:
    masters = slimfit.master_weights
    out = {}
    for name, param in net.named_parameters():
        stored = stored_weight(param)
        master = masters.of(param) if masters is not None else None
        out[name] = (stored.exact if stored is not None else master.host if master is not None else param.detach()).clone()
    return out


@pytest.mark.parametrize("config,freeze_embedding", [
    (BASE, False), (BEST, False), (BASE, True), ({**BEST, "frozen_weights": "int8"}, True),
], ids=["never_picked", "best_options", "frozen_by_user", "frozen_by_user_int8_frozen_weights"])
def test_bit_identical_to_the_embedding_on_the_device_and_counted_on_host(config, freeze_embedding):
    runs = {}
    for placement in ("device", "host"):
        slimfit, net, optimizer = start({**config, "input_embedding": placement}, freeze_embedding=freeze_embedding)
        embedding = net.get_input_embeddings().weight
        assert is_on_host(embedding) == (placement == "host")
        train(slimfit, net, optimizer)
        runs[placement] = (exact_state(slimfit, net), slimfit.report().memory.peak, embedding.numel() * embedding.element_size())
        slimfit.detach()
        assert not is_on_host(embedding)
    (device_state, device_peak, _), (host_state, host_peak, nbytes) = runs["device"], runs["host"]
    assert device_state.keys() == host_state.keys()
    assert all(torch.equal(device_state[k], host_state[k]) for k in device_state)
    assert host_peak.weights_host == nbytes and device_peak.weights_host == 0
    assert device_peak.params - host_peak.params == nbytes
    assert device_peak.total - host_peak.total == nbytes


def test_under_int8_frozen_weights_a_host_embedding_is_not_stored_in_int8_and_looks_up_exact_rows():
    config = {**BEST, "frozen_weights": "int8"}
    peaks = {}
    for placement in ("device", "host"):
        slimfit, net, optimizer = start({**config, "input_embedding": placement})
        embedding = net.get_input_embeddings()
        assert (stored_weight(embedding.weight) is None) == (placement == "host")
        ids = torch.tensor([[3, 7, 200]])
        exact = exact_state(slimfit, net)["model.embed_tokens.weight"][ids].to(embedding.weight.dtype)
        assert torch.equal(embedding(ids), exact) == (placement == "host")  # on the device: the int8 rounding
        train(slimfit, net, optimizer, steps=2)
        peaks[placement] = slimfit.report().memory.peak
        slimfit.detach()
    assert peaks["device"].params - peaks["host"].params == VOCAB * 32 + 4 * VOCAB  # int8 codes + fp32 row scales


def test_rows_are_looked_up_on_host_and_copied_to_the_device_the_model_is_on():
    embedding = torch.nn.Embedding(10, 4)
    placed = HostEmbedding(embedding, torch.device("meta"))  # a device other than the host's
    rows = embedding(torch.tensor([[1, 2, 3]]))
    assert rows.device.type == "meta" and rows.shape == (1, 3, 4)
    assert is_on_host(embedding.weight)
    placed.detach()  # back on its device, hooks gone
    assert embedding.weight.device.type == "meta" and not is_on_host(embedding.weight)
    assert embedding(torch.tensor([1], device="meta")).device.type == "meta"


def test_an_embedding_the_run_trains_is_refused_by_host_and_left_on_the_device_by_auto():
    trains = {**BASE, "scheduler": {"name": "ils", "freeze_ratio": 0.5, "budget": "parameters"}}
    with pytest.raises(IntegrationError, match=r"input_embedding: host.*this run trains it \(unit 'model.embed_tokens.weight'\)"):
        start({**trains, "input_embedding": "host"})
    with pytest.warns(UserWarning, match="input_embedding: auto leaves the input embedding on the device: this run trains"):
        slimfit, net, optimizer = start({**trains, "input_embedding": "auto"})
    assert not is_on_host(net.get_input_embeddings().weight)
    train(slimfit, net, optimizer, steps=1)
    assert slimfit.report().memory.peak.weights_host == 0


def test_an_embedding_always_trained_is_refused():
    config = {**BASE, "units": {"always_train": ["*embed_tokens*"]}, "input_embedding": "host"}
    with pytest.raises(IntegrationError, match="this run trains it"):
        start(config)


def test_a_tied_embedding_is_refused():
    from transformers import LlamaConfig, LlamaForCausalLM

    def tied():
        torch.manual_seed(0)
        return LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                            num_key_value_heads=1, intermediate_size=64, tie_word_embeddings=True))

    with pytest.raises(IntegrationError, match=r"tied to 'lm_head.weight'"):
        start({**BASE, "input_embedding": "host"}, build=tied)


def test_a_checkpoint_of_a_host_embedding_loads_into_a_model_on_the_device(tmp_path):
    slimfit, net, optimizer = start({**BASE, "input_embedding": "host"})
    train(slimfit, net, optimizer, steps=2)
    saved = {k: v.clone() for k, v in net.state_dict().items()}
    fresh = model()
    fresh.load_state_dict(saved)
    assert torch.equal(fresh.get_input_embeddings().weight, net.get_input_embeddings().weight)
    batch = lm_batch(9, vocab=VOCAB)
    with torch.no_grad():
        assert torch.equal(fresh(**batch).logits, net(**batch).logits)


@pytest.mark.parametrize("kind,processes,word", [("DEEPSPEED", 1, "deepspeed"), ("FSDP", 1, "fsdp"), ("MULTI_GPU", 2, "2 process")])
def test_deepspeed_fsdp_and_several_processes_are_refused(kind, processes, word):
    from types import SimpleNamespace

    from accelerate.utils import DistributedType

    from slimfit_accel.host_embedding import why_not_on_host
    from slimfit_accel.units import discover_units
    from slimfit_accel.config import UnitsConfig

    net = model()
    launch = SimpleNamespace(distributed_type=getattr(DistributedType, kind), num_processes=processes)
    units = discover_units(net, UnitsConfig())
    never = {u.name: "too large" for u in units.schedulable}
    assert why_not_on_host(net, units, never) is None
    reason = why_not_on_host(net, units, never, launch)
    assert reason is not None and word in reason.lower()


def test_a_plain_torch_distributed_loop_of_several_processes_is_refused(monkeypatch):
    from slimfit_accel.config import UnitsConfig
    from slimfit_accel.host_embedding import why_not_on_host
    from slimfit_accel.units import discover_units

    net = model()
    units = discover_units(net, UnitsConfig())
    never = {u.name: "too large" for u in units.schedulable}
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda group=None: 2)
    assert "2 processes" in why_not_on_host(net, units, never)  # attach(None, ...) under DDP: no accelerator to ask
