"""Two-process FSDP runs with SlimFit through Accelerate, on CPU (gloo).

Launched by tests/test_fsdp.py as ``torchrun --nproc_per_node 2 fsdp2_worker.py OUT_DIR``. One
launch runs, one after the other (Accelerate's state reset in between):

* ``ddp`` and ``fsdp2``: the same SlimFit config (ILS, weight_delta, SlimFit compression,
  ``optimizer_paging: true``, ``lr_scale``), model, seeds and per-rank data, gradient
  accumulation 2; FSDP2 shards each BertLayer and the root. Under FSDP2 every step records, from
  gathered full tensors, whether the frozen units' weights and optimizer state stayed
  bit-identical and the trained ones moved, and both ranks' decisions. Both arms record the
  decisions, scores, saved-activation bytes per step, final weights and the memory report.
* ``bf16_blocks``: FSDP2 with bf16 mixed precision and whole blocks as units, so whole FSDP
  groups are frozen at the first forward (FSDP2's lazy init).
* ``fsdp1``: Accelerate set to FSDP1, and a model wrapped by torch's FullyShardedDataParallel by
  hand: ``attach`` must refuse both.

Every rank writes ``OUT/rank{R}.json``; the assertions live in the test.
"""

from __future__ import annotations

import json
import os
import sys
import warnings
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from conftest import random_batch, tiny_bert  # noqa: E402
from fsdp_on_cpu import back_to_cpu, fsdp_accelerator  # noqa: E402

from slimfit_accel import SlimFit  # noqa: E402
from slimfit_accel.errors import IntegrationError  # noqa: E402

STEPS, ACCUM, LR = 4, 2, 1e-2
CONFIG = {
    "seed": 3,
    "scheduler": {"name": "ils", "freeze_ratio": 0.75},
    "units": {"always_train": ["classifier.*"]},
    "compression": "slimfit",
    "optimizer_paging": True,
    "lr_scale": 2.0,
    "memory_meter": "always",  # each step's memory is recorded
}
WRAP = {"auto_wrap_policy": "transformer_based_wrap", "transformer_cls_names_to_wrap": ["BertLayer"]}


def full(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor on every rank (a collective for a DTensor)."""
    return (tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor).detach().clone()


def snapshot(params, optimizer) -> list:
    return [(full(p), {k: full(v) for k, v in optimizer.state.get(p, {}).items() if torch.is_tensor(v)}) for p in params]


def same(before: list, after: list) -> bool:
    for (weight, state), (weight_now, state_now) in zip(before, after):
        if not torch.equal(weight, weight_now) or state.keys() != state_now.keys():
            return False
        if not all(torch.equal(state[k], state_now[k]) for k in state):
            return False
    return True


def build(arm: str, config: dict, mixed_precision: str = "no"):
    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs

    torch.manual_seed(0)
    slimfit = SlimFit.from_config(config)
    model = slimfit.prepare_model(tiny_bert(layers=3))
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.1)
    if arm == "ddp":
        accelerator = Accelerator(cpu=True, gradient_accumulation_steps=ACCUM,
                                  kwargs_handlers=[*SlimFit.kwargs_handlers(), InitProcessGroupKwargs(backend="gloo")])
    else:
        accelerator = fsdp_accelerator(gradient_accumulation_steps=ACCUM, mixed_precision=mixed_precision, **WRAP)
    model, optimizer = accelerator.prepare(model, optimizer)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        slimfit.attach(accelerator, model, optimizer, total_steps=STEPS)
    paging_warning = [str(w.message) for w in caught if "optimizer_paging" in str(w.message)]
    return slimfit, model, optimizer, accelerator, paging_warning


def train(arm: str, config: dict, check_freezing: bool, mixed_precision: str = "no") -> dict:
    slimfit, model, optimizer, accelerator, paging_warning = build(arm, config, mixed_precision)
    rank = accelerator.process_index
    inner = optimizer.optimizer
    steps = []
    for step in range(STEPS):
        for micro in range(ACCUM):
            with accelerator.accumulate(model), slimfit.step():
                if micro == 0:
                    trainable = set(slimfit.controller.trainable)
                    frozen = [p for u in slimfit.units.schedulable if u.name not in trainable for p in u.params]
                    trained = [p for u in slimfit.units.all if u.name in trainable or u in slimfit.units.always_trained
                               for p in u.params]
                    if check_freezing:
                        before_frozen, before_trained = snapshot(frozen, inner), snapshot(trained, inner)
                batch = random_batch(batch=4, seed=1000 * rank + 10 * step + micro)
                loss = model(**batch).loss
                accelerator.backward(loss)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
        decisions = [None] * accelerator.num_processes
        dist.all_gather_object(decisions, sorted(trainable))
        memory = slimfit.memory.last
        record = {"trainable": sorted(trainable), "decisions_of_ranks": decisions,
                  "activations": memory.activations, "activations_raw": memory.activations_raw,
                  "frozen_grads_none": all(p.grad is None for p in frozen)}
        if check_freezing:
            record["frozen_unchanged"] = same(before_frozen, snapshot(frozen, inner))
            after_trained = snapshot(trained, inner)
            record["trained_all_moved"] = all(not torch.equal(b[0], a[0]) for b, a in zip(before_trained, after_trained))
        steps.append(record)

    report = slimfit.report(gather=True)
    numel_with_state = sum(p.numel() for p in inner.state)  # a DTensor's numel is the whole tensor's
    out = {
        "steps": steps,
        "scores": slimfit.controller.scores.tolist(),
        "weights": {n: full(p).tolist() for n, p in accelerator.unwrap_model(model).named_parameters()},
        "report": report.to_dict(),
        "rendered": report.render(),
        "model_numel": sum(p.numel() for p in model.parameters()),
        "numel_with_state": numel_with_state,
        "params_with_state": len(inner.state),
        "paging_warning": paging_warning,
        "paging": getattr(slimfit.controller.backend, "paging", None) is not None,
        "param_types": sorted({type(p).__name__ for u in slimfit.units.all for p in u.params}),
        "backend": type(slimfit.controller.backend).__name__,
    }
    slimfit.detach()
    accelerator.wait_for_everyone()
    return out


def fsdp1_refusals() -> dict:
    """FSDP1, through Accelerate and by hand: ``attach`` refuses it before any step."""
    from torch.distributed.fsdp import FullyShardedDataParallel

    refusals = {}
    accelerator = fsdp_accelerator(version=1)
    slimfit = SlimFit.from_config({})
    model = slimfit.prepare_model(tiny_bert())
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR)
    try:
        slimfit.attach(accelerator, model, optimizer)
    except IntegrationError as error:
        refusals["accelerate"] = str(error)
    back_to_cpu()

    slimfit = SlimFit.from_config({})
    model = FullyShardedDataParallel(slimfit.prepare_model(tiny_bert()), device_id=torch.device("cpu"), use_orig_params=True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR)
    try:
        slimfit.attach(None, model, optimizer)
    except IntegrationError as error:
        refusals["by_hand"] = str(error)
    return refusals


def main() -> None:
    out = Path(sys.argv[1])
    results = {}
    for arm in ("ddp", "fsdp2"):
        results[arm] = train(arm, CONFIG, check_freezing=arm == "fsdp2")
        back_to_cpu()
    blocks = {"seed": 1, "units": {"granularity": "block", "always_train": ["classifier.*"]},
              "scheduler": {"name": "ils", "freeze_ratio": 0.7}, "compression": "none"}
    results["bf16_blocks"] = train("fsdp2", blocks, check_freezing=True, mixed_precision="bf16")
    back_to_cpu()
    results["fsdp1"] = fsdp1_refusals()
    (out / f"rank{dist.get_rank()}.json").write_text(json.dumps(results))


if __name__ == "__main__":
    from worker_exit import exit_cleanly

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
    exit_cleanly()
