"""Worker for the 2-process ``optimizer_step: in_backward`` tests under DDP (torchrun, CPU, gloo).
Writes one JSON per rank.

Each variant trains twice through Accelerate's DDP (``make_accelerator``), 10 optimizer steps of
SlimFit with AdamW (weight decay, lr_scale 2), the ordinary step and the step in backward, and
records whether decisions, scores, weights, AdamW state and fp32 masters came out bit-identical,
how many units were stepped from DDP's buckets in backward and how many at ``optimizer.step()``,
and the meter's peak of live gradient bytes. Variants: small buckets (units and buckets do not
line up: a block unit spans several), with ``optimizer_paging``, with ``master_weights: host``
in bf16, with ``gradient_as_bucket_view``, and a model whose middle layer each process uses on
different steps (a parameter unused here but used by the other process gets DDP's average).
``--trainer``: the Trainer with ``SlimFitCallback`` instead, ordinary against in backward.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mixed_precision_reference import lm_batch, tiny_llama  # noqa: E402

from slimfit_accel import SlimFit, make_accelerator  # noqa: E402

STEPS = 10
BASE = {"scheduler": {"name": "ils", "freeze_ratio": 0.5}, "compression": "none", "lr_scale": 2.0, "memory_meter": "always"}
SMALL_BUCKETS = {"bucket_cap_mb": 0.01}  # about 10 KB a bucket: the tiny Llama in a dozen buckets
VARIANTS = {
    "resident": ({}, SMALL_BUCKETS, "no"),
    "paging_blocks": ({"optimizer_paging": True, "units": {"granularity": "block"}}, SMALL_BUCKETS, "no"),
    "paging_masters": ({"optimizer_paging": True, "master_weights": "host"}, SMALL_BUCKETS, "bf16"),
    "bucket_view": ({"optimizer_paging": True}, {"gradient_as_bucket_view": True}, "no"),
    "unused_here": ({"scheduler": {"name": "ils", "freeze_ratio": 0.4}}, {}, "no"),
}


class Branches(nn.Module):
    """``b`` is used only when the caller says: each process uses it on different steps."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b, self.c = nn.Linear(8, 16), nn.Linear(16, 16), nn.Linear(16, 4)

    def forward(self, x, use_b: bool):
        h = torch.tanh(self.a(x))
        if use_b:
            h = torch.tanh(self.b(h))
        return self.c(h)


def loss_of(model, variant: str, rank: int, step: int) -> torch.Tensor:
    if variant == "unused_here":
        x = torch.randn(4, 8, generator=torch.Generator().manual_seed(1000 * rank + step))
        return model(x, use_b=(step + rank) % 3 == 0).pow(2).mean()
    return model(**lm_batch(seed=1000 * rank + step)).loss


def train(variant: str, optimizer_step: str) -> dict:
    from accelerate.state import AcceleratorState, GradientState
    from accelerate.utils import DistributedDataParallelKwargs

    AcceleratorState._reset_state()  # each run its own precision (the process group stays)
    GradientState._reset_state()
    extra, ddp_kwargs, precision = VARIANTS[variant]
    handlers = [DistributedDataParallelKwargs(find_unused_parameters=True, **ddp_kwargs)]
    accelerator = make_accelerator(mixed_precision=precision, kwargs_handlers=handlers)
    slimfit = SlimFit.from_config({**BASE, **extra, "optimizer_step": optimizer_step})
    model = slimfit.prepare_model(Branches() if variant == "unused_here" else tiny_llama())
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    model, optimizer = accelerator.prepare(model, optimizer)
    slimfit.attach(accelerator, model, optimizer)
    backend = slimfit.controller.backend
    rank, decisions, left = accelerator.process_index, [], []
    for step in range(STEPS):
        with accelerator.accumulate(model), slimfit.step():
            decisions.append(list(slimfit.controller.trainable))
            accelerator.backward(loss_of(model, variant, rank, step))
            # What optimizer.step() finds: gradients of their own (not views of DDP's buckets).
            left.append(sum(p.grad is not None and p.grad._base is None for p in model.parameters()))
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    peak_grads, counts = slimfit.report().memory.peak.grads, dict(getattr(backend, "counts", {}))
    scores = slimfit.controller.scores.clone()
    bucket_of = {id(p): i for i, b in enumerate(model.reducer._get_zeros_like_grad_buckets()) for p in b.parameters()}
    spans = max(len({bucket_of[id(p)] for p in unit.params}) for unit in slimfit.units.all)  # buckets a unit spans
    masters = [m.host.clone() for m in slimfit.master_weights] if slimfit.master_weights is not None else []
    slimfit.detach()
    if not slimfit.config.master_weights:  # detached, DDP trains as ever (SlimFit's hook stays, plain)
        accelerator.backward(loss_of(model, variant, rank, STEPS))
        assert all(p.grad is not None for n, p in model.named_parameters() if not n.startswith("module.b."))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    inner = optimizer.optimizer
    params = list(accelerator.unwrap_model(model).parameters())
    state = [{k: v.clone() for k, v in inner.state[p].items()} if p in inner.state else {} for p in params]
    result = {
        "decisions": decisions, "scores": scores, "weights": [p.detach().clone() for p in params],
        "state": state, "masters": masters, "left": left, "peak_grads": peak_grads,
        "buckets": len(set(bucket_of.values())), "spans": spans, "counts": counts,
    }
    return result


def refused_without_ddp() -> str:
    """Several processes, the model not wrapped in DDP: refused at attach."""
    from slimfit_accel.errors import IntegrationError

    slimfit = SlimFit.from_config({**BASE, "optimizer_step": "in_backward"})
    model = slimfit.prepare_model(tiny_llama())
    try:
        slimfit.attach(None, model, torch.optim.AdamW(model.parameters()))
    except IntegrationError as err:
        return str(err)
    return ""


def identical(a: dict, b: dict) -> dict:
    same_state = len(a["state"]) == len(b["state"]) and all(
        x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x) for x, y in zip(a["state"], b["state"]))
    return {
        "decisions": a["decisions"] == b["decisions"],
        "decisions_vary": len({tuple(d) for d in a["decisions"]}) > 1,
        "scores": torch.equal(a["scores"], b["scores"]),
        "weights": all(torch.equal(x, y) for x, y in zip(a["weights"], b["weights"])),
        "state": same_state and sum(len(x) for x in a["state"]) > 0,
        "masters": len(a["masters"]) == len(b["masters"]) and all(torch.equal(x, y) for x, y in zip(a["masters"], b["masters"])),
    }


def main_loop(out: Path, names: list[str]) -> None:
    import torch.distributed as dist

    results = {}
    for variant in names:
        ordinary, in_backward = train(variant, "after_backward"), train(variant, "in_backward")
        results[variant] = {
            "identical": identical(ordinary, in_backward),
            "masters": len(in_backward["masters"]),
            "left": [max(ordinary["left"]), max(in_backward["left"])],
            "peak_grads": [ordinary["peak_grads"], in_backward["peak_grads"]],
            "buckets": in_backward["buckets"],
            "spans": in_backward["spans"],
            "counts": in_backward["counts"],
            "checksum": float(sum(w.double().sum() for w in in_backward["weights"])),
        }
    Path(out, f"rank{dist.get_rank()}.json").write_text(json.dumps({
        "world": dist.get_world_size(), "variants": results, "refused_without_ddp": refused_without_ddp(),
    }))


def trainer_weights(out: Path, optimizer_step: str) -> tuple[list[torch.Tensor], list[float], dict]:
    from transformers import Trainer, TrainerCallback, TrainingArguments

    from slimfit_accel import SlimFitCallback

    batch = lm_batch(0, batch=16)
    data = [{k: v[i] for k, v in batch.items()} for i in range(16)]
    callback = SlimFitCallback({**BASE, "optimizer_paging": True, "optimizer_step": optimizer_step}, print_report=False)
    args = TrainingArguments(output_dir=str(out / optimizer_step), per_device_train_batch_size=2, max_steps=4, use_cpu=True,
                             ddp_backend="gloo", report_to=[], save_strategy="no", disable_tqdm=True, max_grad_norm=0.0,
                             lr_scheduler_type="constant", logging_strategy="steps", logging_steps=1, seed=0,
                             dataloader_num_workers=0)
    counts = {}

    class Counts(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            counts.update(getattr(callback.slimfit.controller.backend, "counts", {}))

    trainer = Trainer(model=tiny_llama(), args=args, train_dataset=data, callbacks=[callback, Counts()])
    trainer.train()
    assert callback.report.steps == 4
    norms = [entry["grad_norm"] for entry in trainer.state.log_history if "grad_norm" in entry]
    return [p.detach().clone() for p in trainer.model.parameters()], norms, counts


def main_trainer(out: Path) -> None:
    import torch.distributed as dist

    ordinary, ordinary_norms, _ = trainer_weights(out, "after_backward")
    in_backward, norms, counts = trainer_weights(out, "in_backward")
    Path(out, f"trainer_rank{dist.get_rank()}.json").write_text(json.dumps({
        "world": dist.get_world_size(),
        "weights": all(torch.equal(a, b) for a, b in zip(ordinary, in_backward)),
        "norms": [ordinary_norms, norms],
        "counts": counts,
        "checksum": float(sum(w.double().sum() for w in in_backward)),
    }))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--trainer", action="store_true")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.trainer:
        main_trainer(Path(args.out))
    else:
        main_loop(Path(args.out), args.variants.split(","))


if __name__ == "__main__":
    from worker_exit import exit_cleanly

    main()
    exit_cleanly()
