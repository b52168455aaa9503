"""Gradient checkpointing (transformers' ``gradient_checkpointing_enable``) with SlimFit, 2 processes.

Launched by tests/test_distributed_checkpointing.py as
``torchrun --nproc_per_node 2 ddp_zero3_checkpointing_worker.py OUT.json CASE [CASE ...]`` with
CASE in ``{ddp,zero3}_{reentrant,nonreentrant}``; the cases run one after the other in this
launch. Each trains a tiny BERT with activation checkpointing and compression on for a few
steps, each rank on its own data, and records per step whether the frozen units' full weights
(and, under ZeRO-3, their fp32 master and Adam moments) stayed bit-identical and the trained
ones moved. A case that fails records the error instead.
"""

from __future__ import annotations

import json
import os
import sys
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from conftest import random_batch, tiny_bert  # noqa: E402

from slimfit_accel import SlimFit  # noqa: E402

STEPS = 4
CONFIG = {"seed": 2, "scheduler": {"name": "ils", "freeze_ratio": 0.6}, "compression": "slimfit"}


def build(case: str):
    from accelerate import Accelerator
    from accelerate.utils import DeepSpeedPlugin, DummyOptim, InitProcessGroupKwargs

    backend, mode = case.split("_")
    slimfit = SlimFit.from_config(CONFIG)
    model = slimfit.prepare_model(tiny_bert(layers=3))
    model.train()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": mode == "reentrant"})
    handlers = SlimFit.kwargs_handlers() + [InitProcessGroupKwargs(backend="gloo")]
    if backend == "ddp":
        accelerator = Accelerator(cpu=True, kwargs_handlers=handlers)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    else:
        ds_config = {
            "train_micro_batch_size_per_gpu": 4,
            "gradient_accumulation_steps": 1,
            "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
            "optimizer": {"type": "AdamW", "params": {"lr": 1e-2, "weight_decay": 0.1, "torch_adam": True}},
            "steps_per_print": 10**9,
        }
        accelerator = Accelerator(deepspeed_plugin=DeepSpeedPlugin(hf_ds_config=ds_config), kwargs_handlers=handlers)
        optimizer = DummyOptim(model.parameters())
    model, optimizer = accelerator.prepare(model, optimizer)
    slimfit.attach(accelerator, model, optimizer, total_steps=STEPS)
    return slimfit, model, optimizer, accelerator


def snapshot(model, optimizer, accelerator) -> dict[str, list[torch.Tensor]]:
    """Full weight (and ZeRO's fp32 master and Adam moments) of every parameter; collective."""
    from accelerate.utils import DistributedType

    if accelerator.distributed_type != DistributedType.DEEPSPEED:
        inner = optimizer.optimizer
        return {
            n: [p.detach().clone()] + [v.clone() for k, v in inner.state.get(p, {}).items() if k != "step"]
            for n, p in accelerator.unwrap_model(model).named_parameters()
        }
    import deepspeed
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    out = {}
    for n, p in model.module.named_parameters():
        with deepspeed.zero.GatheredParameters([p]):
            weight = p.detach().clone()
        state = []
        for key in ("exp_avg", "exp_avg_sq"):
            try:
                state.append(safe_get_full_optimizer_state(p, key).clone())
            except KeyError:  # created at the first optimizer step
                pass
        out[n] = [weight, safe_get_full_fp32_param(p).clone()] + state
    return out


def run_case(case: str) -> dict:
    slimfit, model, optimizer, accelerator = build(case)
    rank = accelerator.process_index
    names = {p_name: unit.name for unit in slimfit.units.all for p_name in unit.param_names}
    steps = []
    for step in range(STEPS):
        before = snapshot(model, optimizer, accelerator)
        with slimfit.step():
            trainable = set(slimfit.controller.trainable) | {u.name for u in slimfit.units.always_trained}
            loss = model(**random_batch(seed=100 * step + rank)).loss
            accelerator.backward(loss)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        after = snapshot(model, optimizer, accelerator)
        frozen = [n for n in after if n in names and names[n] not in trainable]
        trained = [n for n in after if n in names and names[n] in trainable]
        steps.append({
            "n_frozen": len(frozen),
            "n_trained": len(trained),
            "frozen_moved": [n for n in frozen if not all(torch.equal(a, b) for a, b in zip(before[n], after[n]))],
            "trained_still": [n for n in trained if torch.equal(before[n][0], after[n][0])],
            "loss": float(loss.detach()),
        })
    accelerator.wait_for_everyone()
    return {"steps": steps, "world": accelerator.num_processes, "checkpointing": accelerator.unwrap_model(model).is_gradient_checkpointing}


def reset_accelerate() -> None:
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state()
    GradientState._reset_state()
    os.environ.pop("ACCELERATE_USE_DEEPSPEED", None)


def main() -> None:
    out, cases = Path(sys.argv[1]), sys.argv[2:]
    results = {}
    for case in cases:
        torch.manual_seed(0)
        try:
            results[case] = run_case(case)
        except Exception as err:  # recorded for the test to judge; the launch goes on
            results[case] = {"error": f"{type(err).__name__}: {err}", "traceback": traceback.format_exc()[-3000:]}
        reset_accelerate()
    if int(os.environ.get("RANK", 0)) == 0:
        out.write_text(json.dumps(results, indent=1))



if __name__ == "__main__":
    from worker_exit import exit_cleanly

    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
    exit_cleanly()
