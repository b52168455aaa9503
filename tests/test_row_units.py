"""Row units (``units.row_chunks``): vocabulary-sized matrices trained a range of rows at a time.

A matrix larger than ILS's parameter budget is split into row units that fit it, so it trains;
each step updates only the trained rows, exactly as a dense AdamW update of the whole matrix
(with that range's state) updates them; the device holds at most a slice of its state at a time;
checkpoints resume exactly.
"""

from __future__ import annotations

import io
import warnings

import pytest
import torch

from slimfit_accel import SlimFit
from slimfit_accel.errors import ConfigError, IntegrationError
from slimfit_accel.row_units import RANGES, STEPPED

VOCAB = 4000
HYPER = {"lr": 1e-2, "betas": (0.9, 0.99), "weight_decay": 0.01}


def tiny_llama(tied: bool = False):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64,
                         tie_word_embeddings=tied)
    return LlamaForCausalLM(config)


def config(**extra) -> dict:
    return {"units": {"row_chunks": {"rows": 500}}, "optimizer_paging": True, "compression": "none",
            "scheduler": {"name": "ils", "freeze_ratio": 0.8, "budget": "parameters"}, **extra}


def batch(step: int) -> torch.Tensor:
    # tokens from part of the vocabulary only: most rows get a zero gradient, as in real batches
    return torch.randint(0, VOCAB // 2, (2, 12), generator=torch.Generator().manual_seed(step))


def start(model, cfg: dict, chunk_bytes: int | None = None, pre_hook=None, make=None):
    """SlimFit attached to AdamW (or ``make(params)``); ``pre_hook`` runs before each step, ahead of
    SlimFit's (which updates)."""
    slimfit = SlimFit.from_config(cfg)
    slimfit.prepare_model(model)
    optimizer = make(model.parameters()) if make else torch.optim.AdamW(model.parameters(), **HYPER)
    if pre_hook is not None:
        optimizer.register_step_pre_hook(pre_hook)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing is said to be never trained
        slimfit.attach(None, model, optimizer)
    if chunk_bytes is not None:
        slimfit.controller.backend.paging.chunk_bytes = chunk_bytes
    return slimfit, optimizer


def train_step(slimfit, model, optimizer, step: int) -> None:
    ids = batch(step)
    with slimfit.step():
        model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def matrices(model) -> dict[str, torch.nn.Parameter]:
    found = {"model.embed_tokens.weight": model.model.embed_tokens.weight, "lm_head.weight": model.lm_head.weight}
    return {name: p for name, p in found.items() if name == "model.embed_tokens.weight" or p is not found["model.embed_tokens.weight"]}


def test_vocabulary_matrices_become_row_units_that_fit_the_budget_and_train():
    model = tiny_llama()
    slimfit, optimizer = start(model, config(units={"row_chunks": True}))
    names = [u.name for u in slimfit.units.schedulable]
    # rows unset: a row unit is as large as the largest other unit (mlp, 32 x 64), 64 rows of 32
    assert names[:2] == ["model.embed_tokens.weight[0:64]", "model.embed_tokens.weight[64:128]"]
    assert "lm_head.weight[3968:4000]" in names and "model.embed_tokens.weight" not in names
    assert slimfit.report().never_trainable == {}
    assert slimfit.summary().never_trained == 0
    loaded = {name: p.detach().clone() for name, p in matrices(model).items()}
    for step in range(4):
        train_step(slimfit, model, optimizer, step)
    trained = slimfit.controller.stats.trained_steps
    assert trained["model.embed_tokens.weight[0:64]"] >= 1 and trained["lm_head.weight[0:64]"] >= 1
    for name, param in matrices(model).items():
        assert not torch.equal(param.detach(), loaded[name])


OPTIMIZERS = {
    "adamw": lambda params: torch.optim.AdamW(params, **HYPER),
    "sgd": lambda params: torch.optim.SGD(params, lr=1e-2, momentum=0.9, dampening=0.1, weight_decay=0.01),
}


@pytest.mark.parametrize(
    "tied, kind, masters",
    [(False, "adamw", False), (True, "adamw", False), (False, "sgd", False), (False, "adamw", True)],
    ids=["separate", "tied", "sgd-momentum", "master-weights"],
)
def test_trained_rows_equal_a_dense_update_and_frozen_rows_do_not_move(tied, kind, masters):
    model = tiny_llama(tied)
    params = matrices(model)
    captured, holder = {}, {}

    def weights_of(param):  # what the optimizer steps: the fp32 master with master_weights: host
        return holder["slimfit"].master_weights.of(param).host if masters else param.detach()

    def capture(opt, args, kwargs):  # the weights, gradients and state as the step finds them
        for name, param in params.items():
            state = opt.state.get(param, {})
            captured[name] = (
                weights_of(param).clone(),
                param.grad.clone() if param.grad is not None else None,
                {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in state.items()},
            )

    chunk_bytes = 1000  # 7 rows of 32 fp32: each 500-row unit is stepped in slices
    extra = {"master_weights": "host"} if masters else {}
    slimfit, optimizer = start(model, config(**extra), chunk_bytes=chunk_bytes, pre_hook=capture, make=OPTIMIZERS[kind])
    holder["slimfit"] = slimfit
    rows = slimfit.controller.rows
    position = {u.name: i for i, u in enumerate(slimfit.units.schedulable)}

    trained_any = set()
    for step in range(6):
        train_step(slimfit, model, optimizer, step)
        for name, param in params.items():
            before, grad, state = captured[name]
            ranges = rows.ranges(param)
            trained = rows.trained[id(param)]
            now = optimizer.state[param]
            assert now[RANGES] == ranges
            row_keys = [k for k, v in now.items() if isinstance(v, torch.Tensor) and v.dim() == 2]
            assert row_keys == (["exp_avg", "exp_avg_sq"] if kind == "adamw" else ["momentum_buffer"])
            for index, (first, stop) in enumerate(ranges):
                unit = f"{name}[{first}:{stop}]"
                after = weights_of(param)[first:stop]
                if index not in trained:
                    assert torch.equal(after, before[first:stop]), unit
                    for key in row_keys:
                        if key in state:
                            assert torch.equal(now[key][first:stop], state[key][first:stop]), unit
                    continue
                trained_any.add(unit)
                reference = torch.nn.Parameter(before.clone())
                reference.grad = grad.to(reference.dtype)
                dense = OPTIMIZERS[kind]([reference])
                if state and state[STEPPED][index]:  # the range's state, as a tensor of its own would have it
                    dense.state[reference] = {k: v.clone() if v.dim() == 2 else v[index].clone()
                                              for k, v in state.items() if isinstance(v, torch.Tensor)}
                dense.step()
                assert torch.equal(after, reference.detach()[first:stop]), unit
                if masters:  # the bf16 weight is its master rounded
                    assert torch.equal(param.detach()[first:stop], after.to(param.dtype)), unit
                for key, value in dense.state[reference].items():
                    mine = now[key][first:stop] if value.dim() == 2 else now[key][index]
                    assert torch.equal(mine, value if value.dim() == 0 else value[first:stop]), (unit, key)
                # weight_delta scores the unit by its own rows' change (of the weights the model holds)
                old, new = (before[first:stop].to(param.dtype), param.detach()[first:stop])
                change = (old - new).abs().float()
                expected = torch.where(old.abs().float() > 0, change / old.abs().float().clamp_min(torch.finfo(torch.float32).tiny), 0.0)
                assert slimfit.controller.scores[position[unit]].item() == pytest.approx(expected.mean().item(), rel=1e-6)
    assert any(u.startswith("model.embed_tokens") for u in trained_any)
    assert tied or any(u.startswith("lm_head") for u in trained_any)


def test_the_step_holds_at_most_a_slice_of_a_split_matrix_state():
    model = tiny_llama()
    chunk_bytes = 16 * 1024  # the largest unsplit unit is 8 KiB; the embedding is 500 KiB
    slimfit, optimizer = start(model, config(), chunk_bytes=chunk_bytes)
    paging = slimfit.controller.backend.paging
    resident, peak = [0], [0]

    def follow(delta: int) -> None:
        resident[0] += delta
        peak[0] = max(peak[0], resident[0])

    paging.listeners.append(follow)
    for step in range(4):
        train_step(slimfit, model, optimizer, step)
        assert resident[0] == 0  # everything paged back out after the step
    embedding = model.model.embed_tokens.weight
    state = optimizer.state[embedding]
    full_state = sum(state[k].numel() * state[k].element_size() for k in ("exp_avg", "exp_avg_sq"))
    assert full_state == 2 * 4000 * 32 * 4
    # Adam: two state slices of at most chunk_bytes of rows, plus a step count
    assert 0 < peak[0] <= 2 * chunk_bytes + 64
    assert full_state > 30 * peak[0]


def run(steps: range, model, slimfit, optimizer) -> None:
    for step in steps:
        train_step(slimfit, model, optimizer, step)


def test_checkpoint_resume_of_row_units_is_exact():
    model = tiny_llama()
    slimfit, optimizer = start(model, config(), chunk_bytes=4096)
    run(range(3), model, slimfit, optimizer)
    saved = io.BytesIO()
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "slimfit": slimfit.controller.state_dict()}, saved)
    run(range(3, 7), model, slimfit, optimizer)

    saved.seek(0)
    checkpoint = torch.load(saved, weights_only=True)
    resumed = tiny_llama()
    resumed.load_state_dict(checkpoint["model"])
    slimfit2, optimizer2 = start(resumed, config(), chunk_bytes=4096)
    optimizer2.load_state_dict(checkpoint["optimizer"])
    slimfit2.controller.load_state_dict(checkpoint["slimfit"])
    run(range(3, 7), resumed, slimfit2, optimizer2)

    assert slimfit2.controller.stats.trained_steps == slimfit.controller.stats.trained_steps
    for (name, a), b in zip(model.named_parameters(), resumed.parameters()):
        assert torch.equal(a, b), name
    for key in ("step", "exp_avg", "exp_avg_sq"):
        assert torch.equal(optimizer.state[model.lm_head.weight][key], optimizer2.state[resumed.lm_head.weight][key])


def test_row_units_are_refused_where_a_row_slice_would_not_be_exact():
    model = tiny_llama()
    slimfit = SlimFit.from_config(config())
    slimfit.prepare_model(model)
    with pytest.raises(IntegrationError, match="element-wise optimizers .*got Adagrad"):
        slimfit.attach(None, model, torch.optim.Adagrad(model.parameters()))
    with pytest.raises(ConfigError, match="row_chunks .*set optimizer_paging: true"):
        SlimFit.from_config({**config(), "optimizer_paging": False})
    with pytest.raises(ConfigError, match="no unit is one 2-D tensor of more than 1,000,000 parameters"):
        SlimFit.from_config(config(units={"row_chunks": {"min_params": 10**6}})).prepare_model(tiny_llama())


def test_state_of_dense_training_is_taken_over_exactly_and_detach_gives_plain_state_back():
    model = tiny_llama()
    embedding = model.model.embed_tokens.weight
    seen = {}

    def capture(opt, args, kwargs):  # each step's: the loop below stops at the first row step
        seen.update(weight=embedding.detach().clone(), grad=embedding.grad.clone() if embedding.grad is not None else None,
                    state={k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in opt.state[embedding].items()})

    slimfit = SlimFit.from_config(config())
    slimfit.prepare_model(model)
    optimizer = torch.optim.AdamW(model.parameters(), **HYPER)
    ids = batch(99)
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()  # a dense step before SlimFit: plain AdamW state (a scalar step count)
    optimizer.zero_grad(set_to_none=True)
    optimizer.register_step_pre_hook(capture)
    slimfit.attach(None, model, optimizer)
    trained = ()
    for step in range(8):
        train_step(slimfit, model, optimizer, step)
        trained = slimfit.controller.rows.trained[id(embedding)]
        if trained:
            break
    assert trained, "no embedding row unit trained in 8 steps"
    assert seen["state"]["step"].dim() == 0  # the first row step found the dense layout
    reference = torch.nn.Parameter(seen["weight"].clone())
    reference.grad = seen["grad"]
    dense = torch.optim.AdamW([reference], **HYPER)
    dense.state[reference] = {k: v.clone() for k, v in seen["state"].items()}
    dense.step()
    ranges = slimfit.controller.rows.ranges(embedding)
    for index, (first, stop) in enumerate(ranges):
        expected = reference.detach() if index in trained else seen["weight"]
        assert torch.equal(embedding.detach()[first:stop], expected[first:stop]), (first, stop)
    assert optimizer.state[embedding]["step"].tolist() == [2.0 if i in trained else 1.0 for i in range(len(ranges))]

    slimfit.detach()  # the plain optimizer's layout again: one step count (the largest), no markers
    state = optimizer.state[embedding]
    assert RANGES not in state and STEPPED not in state
    assert state["step"].dim() == 0 and state["step"].item() == 2.0
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    assert state is optimizer.state[embedding] and optimizer.state[embedding]["step"].item() == 3.0


def test_minilm_word_embeddings_train_under_the_parameter_budget_with_row_units():
    from transformers import BertConfig, BertForSequenceClassification

    from conftest import random_batch

    torch.manual_seed(0)
    model = BertForSequenceClassification(BertConfig(
        vocab_size=2000, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=32, num_labels=2))
    embeddings = model.bert.embeddings.word_embeddings.weight
    assert embeddings.numel() / sum(p.numel() for p in model.parameters()) > 0.5  # as MiniLM's, 52%
    loaded = embeddings.detach().clone()
    slimfit = SlimFit.from_config({**config(units={"row_chunks": True})})
    slimfit.prepare_model(model)
    assert slimfit.summary().never_trained == 0
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        slimfit.attach(None, model, optimizer)
    for step in range(6):
        with slimfit.step():
            model(**random_batch(seed=step)).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    report = slimfit.report()
    assert report.never_trainable == {}
    trained = [n for n, count in report.trained_steps.items() if n.startswith("bert.embeddings.word_embeddings.weight[") and count]
    assert trained and not torch.equal(embeddings.detach(), loaded)
