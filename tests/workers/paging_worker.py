"""Worker for the 2-process DDP paging test (run with torchrun). Writes one JSON per rank.

Trains the same tiny BERT under DDP, 10 optimizer steps of SlimFit (AdamW with weight decay,
gradient accumulation 2), without and with ``optimizer_paging``, and records whether weights and
optimizer state came out bit-identical and how much state was paged; then once more with paging
and block checkpointing (no compression), which must match within float32 rounding. With
``--zero2``: the same under DeepSpeed ZeRO-2, where paging is a no-op (the state lives in flat
partitions; ``offload_optimizer`` keeps it on host): results bit-identical, nothing paged.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from conftest import random_batch, tiny_bert  # noqa: E402

from slimfit_accel import SlimFit, make_accelerator  # noqa: E402
from slimfit_accel.paging import paged_bytes  # noqa: E402


def run_steps(accelerator, model, optimizer, slimfit, micro_batches: int, on_step=None) -> list:
    """The training loop of every variant; ``on_step()`` after each optimizer step, its answers returned."""
    rank, seen = accelerator.process_index, []
    for micro in range(micro_batches):
        with accelerator.accumulate(model), slimfit.step():
            loss = model(**random_batch(seed=1000 * rank + micro)).loss
            accelerator.backward(loss)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        if on_step is not None and accelerator.sync_gradients:
            seen.append(on_step())
    return seen


def train(paging: bool, steps: int = 10, accum: int = 2, checkpointing: bool = False):
    accelerator = make_accelerator(gradient_accumulation_steps=accum)
    config = {"scheduler": {"name": "ils", "freeze_ratio": 0.8}, "optimizer_paging": paging, "compression": "none", "memory_meter": "always"}
    if checkpointing:
        config["checkpointing"] = {"blocks": "all"}
    slimfit = SlimFit.from_config(config)
    model = slimfit.prepare_model(tiny_bert(layers=3))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    model, optimizer = accelerator.prepare(model, optimizer)
    slimfit.attach(accelerator, model, optimizer)
    paged = run_steps(accelerator, model, optimizer, slimfit, steps * accum, on_step=lambda: paged_bytes(optimizer.optimizer))
    inner = optimizer.optimizer
    weights = [p.detach().clone() for p in accelerator.unwrap_model(model).parameters()]
    report = slimfit.report().memory
    slimfit.detach()  # brings paged state back
    state = [{k: v.clone() for k, v in inner.state[p].items()} for g in inner.param_groups for p in g["params"] if p in inner.state]
    return weights, state, paged, report


def train_zero2(paging: bool, steps: int = 10, accum: int = 2):
    import warnings

    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState
    from accelerate.utils import DeepSpeedPlugin, DummyOptim, InitProcessGroupKwargs
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    # A second DeepSpeed Accelerator in one process needs a fresh state (the process group stays).
    AcceleratorState._reset_state()
    GradientState._reset_state()

    config = {"scheduler": {"name": "ils", "freeze_ratio": 0.8}, "optimizer_paging": paging, "compression": "none", "memory_meter": "always"}
    slimfit = SlimFit.from_config(config)
    model = slimfit.prepare_model(tiny_bert(layers=3))
    ds_config = {
        "train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": accum,
        "zero_optimization": {"stage": 2, "reduce_bucket_size": 2000, "allgather_bucket_size": 2000},
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-2, "weight_decay": 0.1, "torch_adam": True}},
        "steps_per_print": 10**9,
    }
    handlers = SlimFit.kwargs_handlers() + [InitProcessGroupKwargs(backend="gloo")]
    accelerator = Accelerator(deepspeed_plugin=DeepSpeedPlugin(hf_ds_config=ds_config), gradient_accumulation_steps=accum, kwargs_handlers=handlers)
    model, optimizer = accelerator.prepare(model, DummyOptim(model.parameters()))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        slimfit.attach(accelerator, model, optimizer)
    run_steps(accelerator, model, optimizer, slimfit, steps * accum)
    named = list(model.module.named_parameters())
    weights = [safe_get_full_fp32_param(p).detach().clone() for _, p in named]
    state = [[safe_get_full_optimizer_state(p, key) for key in ("exp_avg", "exp_avg_sq")] for _, p in named]
    report = slimfit.report().memory
    slimfit.detach()
    warned = any("optimizer_paging has no effect under DeepSpeed ZeRO" in str(w.message) for w in caught)
    return weights, state, report, warned


def main_zero2(out: str) -> None:
    import torch.distributed as dist

    w0, s0, _, _ = train_zero2(paging=False)
    w1, s1, r1, warned = train_zero2(paging=True)
    same = lambda a, b: a is None and b is None or (a is not None and b is not None and torch.equal(a, b))  # noqa: E731
    result = {
        "world": dist.get_world_size(),
        "weights_equal": all(torch.equal(a, b) for a, b in zip(w0, w1)),
        "state_equal": all(same(a, b) for x, y in zip(s0, s1) for a, b in zip(x, y)),
        "state_present": sum(a is not None for x in s1 for a in x),
        "reported_paged": r1.last.optimizer_paged,
        "warned": warned,
    }
    Path(out, f"zero2_rank{dist.get_rank()}.json").write_text(json.dumps(result))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--zero2", action="store_true")
    args = parser.parse_args()
    if args.zero2:
        main_zero2(args.out)
        return
    w0, s0, _, r0 = train(paging=False)
    w1, s1, paged, r1 = train(paging=True)
    w2, _, _, _ = train(paging=True, checkpointing=True)
    import torch.distributed as dist

    result = {
        "world": dist.get_world_size(),
        "weights_equal": len(w0) == len(w1) and all(torch.equal(a, b) for a, b in zip(w0, w1)),
        "state_equal": len(s0) == len(s1) and all(a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a) for a, b in zip(s0, s1)),
        "paged_bytes": paged,
        "resident_optimizer": [r0.last.optimizer, r1.last.optimizer],
        "reported_paged": r1.last.optimizer_paged,
        "checkpointed_max_diff": max((a - b).abs().max().item() for a, b in zip(w0, w2)),
    }
    Path(args.out, f"rank{dist.get_rank()}.json").write_text(json.dumps(result))


if __name__ == "__main__":
    from worker_exit import exit_cleanly

    main()
    exit_cleanly()
