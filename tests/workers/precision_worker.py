"""Mixed precision with SlimFit (compression on) under DDP and DeepSpeed ZeRO, 2 CPU processes.

Launched by tests/test_precision.py as
``torchrun --nproc_per_node 2 precision_worker.py OUT.json CASE [CASE ...]``; the cases run one
after the other in this launch (Accelerate's state reset in between). Each trains a tiny BERT
for 20 optimizer steps on a learnable toy task (the label is a threshold on the first token)
and records the loss per step. In cases with ``overflow``, rank 0's loss is multiplied by inf
at step OVERFLOW_AT, so that step's gradients overflow on every rank, and the worker records the
controller's step, scores and the full fp32 weights around it.

Cases (what runs on CPU; see the test for what does not):

* ``ddp_bf16``: Accelerate native autocast in bf16.
* ``ddp_fp16``: Accelerate leaves fp16 off on CPU (no autocast, no scaler; it only enables
  them on accelerators), so this case gives the Accelerator a ``torch.amp.GradScaler("cpu")``
  and fp16 autocast before ``prepare``: the same code path Accelerate takes on a GPU
  (scaled backward, ``scaler.step`` that skips the optimizer on inf/NaN, scale update).
* ``ddp_fp16_fused``, ``ddp_fp16_foreach``: the same with AdamW(fused=True) / (foreach=True).
  For a fused optimizer the scaler calls ``step()`` even on inf gradients (the kernel skips the
  update, told by ``optimizer.found_inf``), and Accelerate's ``step_was_skipped`` then says
  False; the worker tells a skip by the scaler's backed-off scale instead.
* ``zero2_bf16``, ``zero3_bf16``: DeepSpeed bf16 (bf16 module, fp32 master partitions).
* ``zero2_fp16``: DeepSpeed fp16 with dynamic loss scaling. On a CPU without oneDNN fp16
  kernels DeepSpeed refuses fp16 ("Type fp16 is not supported on your device"); the refusal is
  recorded and the case runs again with that capability check lifted (``run_with_fp16_allowed``).
* ``zero2_overflow``: fp32 ZeRO-2; an inf gradient takes DeepSpeed's overflow path (the one
  fp16 loss scaling uses: the optimizer is not called, gradients are dropped).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from conftest import tiny_bert  # noqa: E402

from slimfit_accel import SlimFit, hookimpl  # noqa: E402

STEPS, OVERFLOW_AT, MICRO, POOL = 20, 7, 8, 4
CONFIG = {"seed": 1, "scheduler": {"name": "ils", "freeze_ratio": 0.5}, "compression": "slimfit", "memory_meter": "always"}
LR = 3e-3


class StepLog:
    def __init__(self):
        self.__name__ = "step_log"
        self.decided: list[int] = []
        self.ended: list[int] = []

    @hookimpl
    def slimfit_freeze_decision(self, step, trainable, frozen):
        self.decided.append(step)

    @hookimpl
    def slimfit_step_end(self, step, scores):
        self.ended.append(step)


def toy_batch(step: int, rank: int) -> dict:
    """A fixed pool of batches per rank: label 1 when the first token id is below 50."""
    generator = torch.Generator().manual_seed(100 * rank + step % POOL)
    ids = torch.randint(0, 99, (MICRO, 12), generator=generator)
    return {"input_ids": ids, "labels": (ids[:, 0] < 50).long()}


def build(case: str):
    from accelerate import Accelerator
    from accelerate.utils import DeepSpeedPlugin, DummyOptim, InitProcessGroupKwargs

    log = StepLog()
    slimfit = SlimFit.from_config(CONFIG, plugins=[log])
    model = slimfit.prepare_model(tiny_bert())
    handlers = SlimFit.kwargs_handlers() + [InitProcessGroupKwargs(backend="gloo")]
    if case.startswith("ddp"):
        precision = case.split("_")[1]
        accelerator = Accelerator(cpu=True, mixed_precision=precision, kwargs_handlers=handlers)
        if precision == "fp16":
            accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
            accelerator.native_amp = True
        kind = {"fused": {"fused": True}, "foreach": {"foreach": True}}.get(case.split("_")[-1], {})
        optimizer = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.01, **kind)
    else:
        stage = int(case[4])
        precision = case.split("_")[1] if case.split("_")[1] in ("bf16", "fp16") else "no"
        ds_config = {
            "train_micro_batch_size_per_gpu": MICRO,
            "gradient_accumulation_steps": 1,
            "gradient_clipping": 1.0,
            "zero_optimization": {"stage": stage, "stage3_param_persistence_threshold": 0},
            "optimizer": {"type": "AdamW", "params": {"lr": LR, "weight_decay": 0.01, "torch_adam": True}},
            "bf16": {"enabled": precision == "bf16"},
            "fp16": {"enabled": precision == "fp16", "initial_scale_power": 10},
            "steps_per_print": 10**9,
        }
        accelerator = Accelerator(deepspeed_plugin=DeepSpeedPlugin(hf_ds_config=ds_config), mixed_precision=precision,
                                  kwargs_handlers=handlers)
        optimizer = DummyOptim(model.parameters())
    model, optimizer = accelerator.prepare(model, optimizer)
    slimfit.attach(accelerator, model, optimizer, total_steps=STEPS)
    return slimfit, model, optimizer, accelerator, log


def full_weights(model, accelerator) -> dict[str, torch.Tensor]:
    from accelerate.utils import DistributedType

    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        from deepspeed.utils import safe_get_full_fp32_param

        return {n: safe_get_full_fp32_param(p).clone() for n, p in model.module.named_parameters()}
    return {n: p.detach().float().clone() for n, p in accelerator.unwrap_model(model).named_parameters()}


def run_case(case: str) -> dict:
    slimfit, model, optimizer, accelerator, log = build(case)
    rank = accelerator.process_index
    overflow = case in ("ddp_fp16", "ddp_fp16_fused", "ddp_fp16_foreach", "zero2_fp16", "zero2_overflow")
    losses, record = [], {"case": case}
    # The dtype a linear layer computes in (Accelerate casts the model's outputs back to fp32).
    query = model.module.bert.encoder.layer[0].attention.self.query

    def note_dtype(module, args, out):
        record.setdefault("compute_dtype", str(out.dtype))

    query.register_forward_hook(note_dtype)
    micro = 0
    while slimfit.controller.step < STEPS and micro < STEPS + 5:
        step = slimfit.controller.step
        force = overflow and micro == OVERFLOW_AT
        if force:
            scaler = accelerator.scaler
            before = {"step": step, "scale": scaler.get_scale() if scaler is not None else None, "weights": full_weights(model, accelerator),
                      "scores": slimfit.controller.scores.clone(), "ended": len(log.ended),
                      "trained_steps": dict(slimfit.controller.stats.trained_steps)}
        with slimfit.step():
            loss = model(**toy_batch(micro, rank)).loss
            if force and rank == 0:
                loss = loss * float("inf")
            accelerator.backward(loss)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        if force:
            after = full_weights(model, accelerator)
            record["overflow"] = {
                # Accelerate's flag is False for a fused optimizer (the scaler still calls step()).
                "skipped": (bool(optimizer.step_was_skipped) if before["scale"] is None
                            else scaler.get_scale() < before["scale"]),
                "step_before": before["step"], "step_after": slimfit.controller.step,
                "scores_unchanged": torch.equal(before["scores"], slimfit.controller.scores),
                "scorer_calls_during": len(log.ended) - before["ended"],
                "trained_steps_unchanged": before["trained_steps"] == slimfit.controller.stats.trained_steps,
                "weights_moved": sorted(n for n, w in after.items() if not torch.equal(w, before["weights"][n])),
                "n_weights": len(after),
            }
        else:
            losses.append(float(loss.detach().float()))
        micro += 1
    mean = torch.tensor(losses, dtype=torch.float64)
    torch.distributed.all_reduce(mean)
    record.update({
        "losses": (mean / accelerator.num_processes).tolist(),
        "steps": slimfit.controller.step,
        "decided": log.decided,
        "ended": log.ended,
        "world": accelerator.num_processes,
        "param_dtype": str(next(model.parameters()).dtype),
        "activations_raw": slimfit.report().memory.last.activations_raw,
        "activations_stored": slimfit.report().memory.last.activations,
    })
    accelerator.wait_for_everyone()
    return record


def run_with_fp16_allowed(case: str) -> dict:
    """DeepSpeed's CPU accelerator claims fp16 only where oneDNN has fp16 kernels, and refuses
    it otherwise; torch computes fp16 on any CPU, so lift that check for this case and run
    DeepSpeed's real fp16 path (fp16 module, fp32 master, dynamic loss scaling)."""
    from deepspeed.accelerator import get_accelerator

    accelerator = get_accelerator()
    accelerator.is_fp16_supported = lambda: True
    try:
        return run_case(case)
    finally:
        del accelerator.is_fp16_supported


def reset_accelerate() -> None:
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state()
    GradientState._reset_state()
    os.environ.pop("ACCELERATE_USE_DEEPSPEED", None)
    os.environ.pop("ACCELERATE_MIXED_PRECISION", None)


def main() -> None:
    out, cases = Path(sys.argv[1]), sys.argv[2:]
    results = {}
    for case in cases:
        torch.manual_seed(0)
        try:
            results[case] = run_case(case)
        except ValueError as err:
            if "not supported on your device" not in str(err):
                raise
            reset_accelerate()
            results[case] = run_with_fp16_allowed(case)
            results[case]["refused"] = str(err)
        reset_accelerate()
    if int(os.environ.get("RANK", 0)) == 0:
        out.write_text(json.dumps(results, indent=1))



if __name__ == "__main__":
    from worker_exit import exit_cleanly

    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
    exit_cleanly()
