"""Worker for the 2-process ``master_weights: host`` tests (run with torchrun). One JSON per rank.

DDP (default): a tiny Llama trained 10 optimizer steps (AdamW with weight decay, gradient
accumulation 2, Accelerate's bf16 autocast) with SlimFit's ``master_weights: host`` (ILS
freeze_ratio 0.5, no compression), then the plain mixed-precision reference
(``tests/mixed_precision_reference.py``) under the same DDP, freezing what SlimFit froze at each
step: bf16 weights, fp32 masters and AdamW state are compared bit for bit. Once more with rank 1
building different fp32 weights: SlimFit takes rank 0's masters as DDP takes rank 0's weights,
so the run equals the first.

``--zero2``: DeepSpeed ZeRO-2 in bf16 (its optimizer keeps the fp32 masters), with and without
``master_weights: host``: SlimFit warns, keeps no masters, and the runs are bit-identical
(bf16 weights, DeepSpeed's fp32 masters and Adam state).
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mixed_precision_reference import (  # noqa: E402
    LR, WEIGHT_DECAY, ReferenceMixedPrecision, compare, lm_batch, tiny_llama, trained_names,
)

from slimfit_accel import SlimFit, make_accelerator  # noqa: E402

STEPS, ACCUM = 10, 2
CONFIG = {"scheduler": {"name": "ils", "freeze_ratio": 0.5}, "compression": "none", "optimizer_paging": True, "memory_meter": "always",
          "master_weights": "host"}


def train_slimfit(perturb_rank: int | None = None):
    """SlimFit's run; returns its parameters, SlimFit, the torch optimizer, the parameters trained
    at each step and the memory report."""
    accelerator = make_accelerator(gradient_accumulation_steps=ACCUM, mixed_precision="bf16")
    slimfit = SlimFit.from_config(CONFIG)
    model = tiny_llama()
    if accelerator.process_index == perturb_rank:
        with torch.no_grad():
            for param in model.parameters():
                param.add_(0.01)
    model = slimfit.prepare_model(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=WEIGHT_DECAY)
    model, optimizer = accelerator.prepare(model, optimizer)
    slimfit.attach(accelerator, model, optimizer)
    decisions = []
    for micro in range(STEPS * ACCUM):
        with accelerator.accumulate(model), slimfit.step():
            if micro % ACCUM == 0:
                decisions.append(sorted(trained_names(model)))
            accelerator.backward(model(**lm_batch(seed=1000 * accelerator.process_index + micro)).loss)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    params = list(accelerator.unwrap_model(model).parameters())
    return params, slimfit, optimizer.optimizer, decisions, slimfit.report().memory


def train_reference(decisions: list[list[str]]) -> ReferenceMixedPrecision:
    """The reference under the same DDP and autocast, freezing what SlimFit froze."""
    accelerator = make_accelerator(gradient_accumulation_steps=ACCUM, mixed_precision="bf16")
    reference = ReferenceMixedPrecision(tiny_llama())
    model = reference.model = accelerator.prepare(reference.model)
    for micro in range(STEPS * ACCUM):
        with accelerator.accumulate(model):
            reference.freeze(set(decisions[micro // ACCUM]))
            accelerator.backward(model(**lm_batch(seed=1000 * accelerator.process_index + micro)).loss)
            if accelerator.sync_gradients:
                reference.step()
    return reference


def main_ddp(out: Path) -> None:
    params, slimfit, inner, decisions, report = train_slimfit()
    reference = train_reference(decisions)
    result = compare(params, lambda p: slimfit.master_weights.of(p).host, lambda p: inner.state.get(p, {}), reference)
    perturbed, slimfit2, _, decisions2, _ = train_slimfit(perturb_rank=1)
    result.update(
        world=dist.get_world_size(),
        decisions=[len(d) for d in decisions],
        changing=len({tuple(d) for d in decisions}) > 1,
        perturbed_equal=decisions2 == decisions and all(torch.equal(a, b) for a, b in zip(params, perturbed))
        and all(torch.equal(slimfit.master_weights.of(a).host, slimfit2.master_weights.of(b).host) for a, b in zip(params, perturbed)),
        master_paged=report.last.master_paged,
        params_bytes=report.last.params,
        numel=sum(p.numel() for p in params),
    )
    (out / f"ddp_rank{dist.get_rank()}.json").write_text(json.dumps(result))


def train_zero2(master_weights: bool):
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState
    from accelerate.utils import DeepSpeedPlugin, DummyOptim, InitProcessGroupKwargs
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    AcceleratorState._reset_state()  # a second DeepSpeed Accelerator in one process
    GradientState._reset_state()
    config = {**CONFIG, "master_weights": "host" if master_weights else None}
    slimfit = SlimFit.from_config(config)
    model = slimfit.prepare_model(tiny_llama())
    ds_config = {
        "train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": ACCUM,
        "zero_optimization": {"stage": 2, "reduce_bucket_size": 2000, "allgather_bucket_size": 2000},
        "optimizer": {"type": "AdamW", "params": {"lr": LR, "weight_decay": WEIGHT_DECAY, "torch_adam": True}},
        "bf16": {"enabled": True}, "steps_per_print": 10**9,
    }
    handlers = SlimFit.kwargs_handlers() + [InitProcessGroupKwargs(backend="gloo")]
    accelerator = Accelerator(deepspeed_plugin=DeepSpeedPlugin(hf_ds_config=ds_config), mixed_precision="bf16",
                              gradient_accumulation_steps=ACCUM, kwargs_handlers=handlers)
    model, optimizer = accelerator.prepare(model, DummyOptim(model.parameters()))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        slimfit.attach(accelerator, model, optimizer)
    for micro in range(STEPS * ACCUM):
        with accelerator.accumulate(model), slimfit.step():
            accelerator.backward(model(**lm_batch(seed=1000 * accelerator.process_index + micro)).loss)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    named = list(model.module.named_parameters())
    weights = [p.detach().clone() for _, p in named]
    masters = [safe_get_full_fp32_param(p).detach().clone() for _, p in named]
    state = [[safe_get_full_optimizer_state(p, key) for key in ("exp_avg", "exp_avg_sq")] for _, p in named]
    report = slimfit.report().memory
    warned = sum("master_weights: host has no effect under DeepSpeed" in str(w.message) for w in caught)
    held = slimfit.master_weights
    slimfit.detach()
    return weights, masters, state, report, warned, held


def main_zero2(out: Path) -> None:
    w0, m0, s0, _, _, _ = train_zero2(master_weights=False)
    w1, m1, s1, r1, warned, held = train_zero2(master_weights=True)
    same = lambda a, b: a is None and b is None or (a is not None and b is not None and torch.equal(a, b))  # noqa: E731
    result = {
        "world": dist.get_world_size(),
        "weights_bf16": all(w.dtype == torch.bfloat16 for w in w1),
        "weights_equal": all(torch.equal(a, b) for a, b in zip(w0, w1)),
        "masters_equal": all(torch.equal(a, b) for a, b in zip(m0, m1)),
        "state_equal": all(same(a, b) for x, y in zip(s0, s1) for a, b in zip(x, y)),
        "state_present": sum(a is not None for x in s1 for a in x),
        "warned": warned,
        "slimfit_masters": None if held is None else len(held),
        "master_paged": r1.last.master_paged,
        "optimizer_paged": r1.last.optimizer_paged,
    }
    (out / f"zero2_rank{dist.get_rank()}.json").write_text(json.dumps(result))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--zero2", action="store_true")
    args = parser.parse_args()
    (main_zero2 if args.zero2 else main_ddp)(Path(args.out))


if __name__ == "__main__":
    from worker_exit import exit_cleanly

    main()
    exit_cleanly()
