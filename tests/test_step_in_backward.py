"""``optimizer_step: in_backward``: each unit updated as its gradient completes in backward.
Bit-identical to the ordinary step (weights, optimizer state, fp32 masters, scores, decisions)
with and without paging and master weights; fewer live gradients; every setup that cannot be
exact refused with one line."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from mixed_precision_reference import lm_batch, tiny_llama
from slimfit_accel import SlimFit
from slimfit_accel.errors import ConfigError, IntegrationError
from slimfit_accel.paging import is_paged

BASE = {"scheduler": {"name": "ils", "freeze_ratio": 0.5}, "compression": "none", "lr_scale": 2.0}


def start(config, layers=2, optimizer="adamw", device="cpu"):
    slimfit = SlimFit.from_config(config)
    model = slimfit.prepare_model(tiny_llama(layers=layers)).to(device)
    if optimizer == "adamw":
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    else:
        opt = torch.optim.SGD(model.parameters(), lr=1e-2, momentum=0.9, weight_decay=0.1)
    slimfit.attach(None, model, opt)
    return slimfit, model, opt


def train(slimfit, model, opt, steps=10, left=None, autocast=False):
    decisions = []
    for step in range(steps):
        with slimfit.step():
            decisions.append(tuple(slimfit.controller.trainable))
            batch = {k: v.to(model.device) for k, v in lm_batch(step).items()}
            with torch.autocast(model.device.type, dtype=torch.bfloat16, enabled=autocast):
                loss = model(**batch).loss
            loss.backward()
            if left is not None:  # gradients the loop's optimizer.step() finds
                left.append(sum(p.grad is not None for p in model.parameters()))
            opt.step()
            opt.zero_grad(set_to_none=True)
    return decisions


def run(config, optimizer="adamw", steps=10, device="cpu", autocast=False, setup=None):
    slimfit, model, opt = start(config, optimizer=optimizer, device=device)
    if setup is not None:
        setup(slimfit)
    left = []
    decisions = train(slimfit, model, opt, steps, left, autocast=autocast)
    assert (max(left) == 0) == (config.get("optimizer_step") == "in_backward")
    masters = {id(m.param): m.host.clone() for m in slimfit.master_weights} if slimfit.master_weights else {}
    return SimpleNamespace(slimfit=slimfit, model=model, opt=opt, decisions=decisions, masters=masters,
                           scores=slimfit.controller.scores.clone(), report=slimfit.report())


def assert_identical(a, b):
    assert a.decisions == b.decisions and len(set(a.decisions)) > 1
    assert torch.equal(a.scores, b.scores)
    entries = 0
    for pa, pb in zip(a.model.parameters(), b.model.parameters()):
        assert torch.equal(pa, pb)
        sa, sb = a.opt.state.get(pa, {}), b.opt.state.get(pb, {})
        assert sa.keys() == sb.keys()
        for key in sa:
            assert torch.equal(sa[key], sb[key]), key
            entries += 1
        if a.masters:
            assert torch.equal(a.masters[id(pa)], b.masters[id(pb)])
    assert entries > 0


SETTINGS = {
    "resident": {},
    "paging": {"optimizer_paging": True},
    "paging_masters": {"optimizer_paging": True, "master_weights": "host"},
}


@pytest.mark.parametrize("setting", SETTINGS, ids=list(SETTINGS))
def test_adamw_bit_identical_to_the_ordinary_step(setting):
    config = {**BASE, **SETTINGS[setting]}
    ordinary = run(config)
    in_backward = run({**config, "optimizer_step": "in_backward"})
    assert_identical(ordinary, in_backward)
    if setting != "resident":  # between steps every state tensor is on host
        opt = in_backward.opt
        assert all(is_paged(t) for s in opt.state.values() for k, t in s.items() if k != "step")
        assert in_backward.slimfit.controller.backend.paging.chunks_stepped > 0
    for result in (ordinary, in_backward):
        result.slimfit.detach()


@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16_autocast"])
def test_with_checkpointing_finished_units_are_stepped_before_each_recomputation(autocast):
    """A unit whose gradients are complete is stepped before the next checkpointed block is
    recomputed, not at the next gradient hook after it: no finished gradient is held through a
    recomputation. Bit-identical still: inside the recomputation the update runs with grad mode
    and autocast off, as at a gradient hook."""
    config = {**BASE, **SETTINGS["paging_masters"], "checkpointing": {"blocks": "all"}}
    held = []

    def probe(slimfit):  # runs after the backend's own callback
        params = list(slimfit.model.parameters())
        slimfit.checkpointing.before_recompute.append(lambda: held.append(sum(p.grad is not None for p in params)))

    ordinary = run(config, autocast=autocast)
    in_backward = run({**config, "optimizer_step": "in_backward"}, autocast=autocast, setup=probe)
    assert_identical(ordinary, in_backward)
    assert len(held) >= 10 and max(held) == 0  # a block is recomputed when something below it trains
    assert in_backward.slimfit.controller.backend.counts["backward"] > 0


def test_paging_chunk_mib_sizes_the_chunks_and_needs_paging():
    config = {**BASE, **SETTINGS["paging_masters"], "optimizer_step": "in_backward"}
    small = run({**config, "paging_chunk_mib": 0.002})
    paging = small.slimfit.controller.backend.paging
    assert paging.chunk_bytes == int(0.002 * 2**20) and paging.slices_stepped > 0  # larger tensors by row slices
    assert_identical(run(config), small)
    with pytest.raises(ConfigError, match="paging_chunk_mib.*optimizer_paging: true"):
        SlimFit.from_config({**BASE, "paging_chunk_mib": 4})
    SlimFit.from_config({**BASE, "paging_chunk_mib": 32})  # the default, as a dumped config holds it
    with pytest.raises(ConfigError, match="paging_chunk_mib"):
        SlimFit.from_config({**BASE, "optimizer_paging": True, "paging_chunk_mib": 0})


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (pinned host state, prefetch on a side stream)")
def test_on_cuda_the_next_unit_is_prefetched_and_results_stay_bit_identical():
    config = {**BASE, **SETTINGS["paging_masters"]}
    ordinary = run(config, device="cuda")
    slimfit, model, opt = start({**config, "optimizer_step": "in_backward"}, device="cuda")
    paging = slimfit.controller.backend.paging
    prefetched = []
    prefetch = paging.prefetch
    paging.prefetch = lambda params: (prefetched.append(len(params)), prefetch(params))[1]
    left = []
    decisions = train(slimfit, model, opt, 10, left)
    torch.cuda.synchronize()
    masters = {id(m.param): m.host.clone() for m in slimfit.master_weights}
    in_backward = SimpleNamespace(model=model, opt=opt, decisions=decisions, masters=masters,
                                  scores=slimfit.controller.scores.clone())
    assert_identical(ordinary, in_backward)
    assert max(left) == 0 and len(prefetched) > 10
    assert all(m.host.is_pinned() for m in slimfit.master_weights)
    assert all(is_paged(t) and t.is_pinned() for s in opt.state.values() for k, t in s.items() if k != "step")


@pytest.mark.parametrize("scorer", ["grad_norm", "random"])
def test_other_scorers_and_sgd_score_the_same(scorer):
    config = {**BASE, "scorer": {"name": scorer}, "optimizer_paging": True}
    ordinary = run(config, optimizer="sgd", steps=6)
    in_backward = run({**config, "optimizer_step": "in_backward"}, optimizer="sgd", steps=6)
    assert_identical(ordinary, in_backward)


def test_gradients_are_released_as_backward_goes():
    config = {**BASE, "scheduler": {"name": "ils", "freeze_ratio": 0.2}, "optimizer_paging": True, "memory_meter": "always"}
    peaks = {}
    for mode in ("after_backward", "in_backward"):
        slimfit, model, opt = start({**config, "optimizer_step": mode}, layers=4)
        train(slimfit, model, opt, steps=3)
        if mode == "in_backward":  # nothing left for the loop's step: every gradient already freed
            assert all(p.grad is None for p in model.parameters())
        peaks[mode] = slimfit.report().memory.peak.grads
        slimfit.detach()
    largest = max(p.numel() * p.element_size() for p in model.parameters())
    # the ordinary step holds every trained gradient at once; in backward, the unit being stepped
    # and the gradient that arrived after it
    assert 0 < peaks["in_backward"] <= 2 * largest < peaks["after_backward"] / 2  # > 0: the meter saw them


def test_gradient_accumulation_is_refused():
    from slimfit_accel import make_accelerator

    slimfit = SlimFit.from_config({**BASE, "optimizer_step": "in_backward"})
    model = slimfit.prepare_model(tiny_llama())
    accelerator = make_accelerator(gradient_accumulation_steps=2)
    opt = torch.optim.AdamW(model.parameters())
    model, opt = accelerator.prepare(model, opt)
    with pytest.raises(IntegrationError, match="in_backward is not supported here: gradient_accumulation_steps=2"):
        slimfit.attach(accelerator, model, opt)


def test_a_second_backward_before_the_step_is_refused():
    slimfit, model, opt = start({**BASE, "optimizer_step": "in_backward"})
    with slimfit.step():
        model(**lm_batch(0)).loss.backward()
        with pytest.raises(IntegrationError, match=r"got a second gradient before optimizer.step\(\)"):
            model(**lm_batch(1)).loss.backward()


def test_clipping_is_refused_and_allowed_again_after_detach():
    from slimfit_accel import make_accelerator

    slimfit = SlimFit.from_config({**BASE, "optimizer_step": "in_backward"})
    model = slimfit.prepare_model(tiny_llama())
    accelerator = make_accelerator()
    opt = torch.optim.AdamW(model.parameters())
    model, opt = accelerator.prepare(model, opt)
    slimfit.attach(accelerator, model, opt)
    with slimfit.step():
        accelerator.backward(model(**lm_batch(0)).loss)
        with pytest.raises(IntegrationError, match="clip_grad_norm_ was called.*Trainer: max_grad_norm=0"):
            accelerator.clip_grad_norm_(model.parameters(), 1.0)
        norm = accelerator.clip_grad_norm_(model.parameters(), float("inf"))  # asked for, not clipping: given
        assert torch.isfinite(norm) and norm > 0
        with pytest.raises(IntegrationError, match="clip_grad_value_ was called"):
            torch.nn.utils.clip_grad_value_(model.parameters(), 1.0)
        other = torch.nn.Parameter(torch.ones(3))
        other.grad = torch.full((3,), 4.0)
        torch.nn.utils.clip_grad_norm_([other], 1.0)  # parameters SlimFit does not step: clipped as usual
        assert torch.allclose(other.grad.norm(), torch.tensor(1.0))
    slimfit.detach()
    assert torch.nn.utils.clip_grad_norm_.__module__ == "torch.nn.utils.clip_grad"


def test_grad_scaler_and_closure_are_refused():
    slimfit = SlimFit.from_config({**BASE, "optimizer_step": "in_backward"})
    model = slimfit.prepare_model(tiny_llama())
    opt = torch.optim.AdamW(model.parameters(), fused=True)  # the scaler hands fused optimizers its scale
    slimfit.attach(None, model, opt)
    scaler = torch.amp.GradScaler("cpu")
    with slimfit.step():
        scaler.scale(model(**lm_batch(0)).loss).backward()
        with pytest.raises(IntegrationError, match="a GradScaler is stepping this optimizer"):
            scaler.step(opt)
    opt.grad_scale = opt.found_inf = None
    with slimfit.step():
        model(**lm_batch(1)).loss.backward()
        with pytest.raises(IntegrationError, match="a step with a closure"):
            opt.step(lambda: torch.tensor(0.0))


def test_fp16_accelerator_is_refused():
    from accelerate.utils import DistributedType

    slimfit = SlimFit.from_config({**BASE, "optimizer_step": "in_backward"})
    model = slimfit.prepare_model(tiny_llama())
    accelerator = SimpleNamespace(distributed_type=DistributedType.NO, num_processes=1, mixed_precision="fp16",
                                  scaler=torch.amp.GradScaler("cpu"), gradient_accumulation_steps=1)
    with pytest.raises(IntegrationError, match="fp16 loss scaling needs every gradient"):
        slimfit.attach(accelerator, model, torch.optim.AdamW(model.parameters()))


def test_deepspeed_is_refused():
    from accelerate.utils import DistributedType

    slimfit = SlimFit.from_config({**BASE, "optimizer_step": "in_backward"})
    model = slimfit.prepare_model(tiny_llama())
    accelerator = SimpleNamespace(distributed_type=DistributedType.DEEPSPEED, num_processes=1)
    with pytest.raises(IntegrationError, match="DeepSpeed runs its own optimizer step"):
        slimfit.attach(accelerator, model, torch.optim.AdamW(model.parameters()))


def test_config_value_is_checked():
    with pytest.raises(ConfigError, match="optimizer_step"):
        SlimFit.from_config({"optimizer_step": "during_backward"})


def trainer_weights(tmp_path, optimizer_step, **arguments):
    from transformers import Trainer, TrainingArguments

    from slimfit_accel import SlimFitCallback

    batch = lm_batch(0, batch=8)
    data = [{k: v[i] for k, v in batch.items()} for i in range(8)]
    callback = SlimFitCallback({**BASE, "optimizer_step": optimizer_step}, print_report=False)
    args = TrainingArguments(output_dir=str(tmp_path / optimizer_step), per_device_train_batch_size=2, max_steps=4,
                             use_cpu=True, report_to=[], save_strategy="no", disable_tqdm=True,
                             lr_scheduler_type="constant", **{"logging_strategy": "no", **arguments})
    trainer = Trainer(model=tiny_llama(), args=args, train_dataset=data, callbacks=[callback])
    trainer.train()
    assert callback.report.steps == 4
    norms = [entry["grad_norm"] for entry in trainer.state.log_history if "grad_norm" in entry]
    return [p.detach().clone() for p in trainer.model.parameters()], norms


def test_trainer_in_backward_equals_the_ordinary_step_and_its_clipping_is_refused(tmp_path):
    logged = {"max_grad_norm": 0.0, "logging_strategy": "steps", "logging_steps": 1}
    ordinary, ordinary_norms = trainer_weights(tmp_path, "after_backward", **logged)
    in_backward, norms = trainer_weights(tmp_path, "in_backward", **logged)
    assert all(torch.equal(a, b) for a, b in zip(ordinary, in_backward))
    # the logged gradient norm: kept per parameter as each unit was stepped
    assert len(norms) == 4 and norms == pytest.approx(ordinary_norms, rel=1e-5)
    with pytest.raises(IntegrationError, match="SlimFitCallback: .*max_grad_norm=1.0 clips .* set max_grad_norm=0"):
        trainer_weights(tmp_path, "in_backward")  # the Trainer's default clips
    with pytest.raises(IntegrationError, match="gradient_accumulation_steps=2"):
        trainer_weights(tmp_path, "in_backward", max_grad_norm=0.0, gradient_accumulation_steps=2)


def test_row_chunks_are_refused():
    slimfit = SlimFit.from_config({**BASE, "optimizer_step": "in_backward", "optimizer_paging": True,
                                   "units": {"row_chunks": True}})
    model = slimfit.prepare_model(tiny_llama())
    with pytest.raises(IntegrationError, match="in_backward is not supported here: units.row_chunks"):
        slimfit.attach(None, model, torch.optim.AdamW(model.parameters()))
