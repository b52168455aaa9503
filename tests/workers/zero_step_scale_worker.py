"""What scorers and the optimizer see of scale under DeepSpeed ZeRO-2 and ZeRO-3, 2 CPU processes.

Launched by tests/test_zero_step_scale.py as
``torchrun --nproc_per_node 2 zero_step_scale_worker.py OUT.json CASE [CASE ...]``; the cases
run one after the other (Accelerate's state reset in between). A tiny BERT trains for STEPS
optimizer steps on the precision worker's toy task, the same data in every case.

* ``fp16_one_group``, ``fp16_two_groups``, ``fp16_two_groups_offload``: fp16 with dynamic loss
  scaling (the CPU capability check lifted, as in precision_worker.py), gradient clipping, the
  ``grad_norm`` scorer, a torch AdamW with the parameters in one group or split into two
  identical groups (second: encoder layer 1 and the classifier). How parameters are grouped
  changes nothing in training, so the scores must not change either. Records the scores
  ``slimfit_step_end`` reported each step and DeepSpeed's global gradient norm (above CLIP).
* ``fp16_z3_one_group``, ``fp16_z3_two_groups``, ``fp16_z3_two_groups_offload``,
  ``fp16_z3_sub_groups``, ``bf16_z3_one_group``, ``bf16_z3_two_groups``: the same under ZeRO-3
  (``sub_groups``: one param group that DeepSpeed steps as several sub-groups, a small
  ``sub_group_size``; bf16: no loss scaling, clipping only). The scorer is ``grad_probe``
  (``grad_norm`` that also keeps the gradients it was given); the worker copies each sub-group's
  fp32 gradient as DeepSpeed hands it to the basic optimizer (``_optimizer_step``) and records,
  per step, every unit whose scorer gradient is not bit-equal to DeepSpeed's slice of it (by
  DeepSpeed's ``grad_position``), with the ratio of their norms.
* ``lr_raise_once``: fp32, ``lr_scale`` 3; the basic optimizer's first update raises
  RuntimeError("out of memory"), which the loop catches. Records the lr each update saw and the
  param groups' lr after every step.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from conftest import tiny_bert  # noqa: E402
from precision_worker import reset_accelerate, toy_batch  # noqa: E402

from slimfit_accel import SlimFit, hookimpl  # noqa: E402
from slimfit_accel.strategies.scoring.grad_norm import GradNorm  # noqa: E402

STEPS, MICRO, LR = 5, 8, 3e-3
CLIP = 0.1  # below every step's gradient norm (about 0.2 here): clipping acts in every step
SUB_GROUP_SIZE = 4000  # elements of a rank's partition: the tiny BERT's group splits into several


class GradProbe(GradNorm):
    """``grad_norm`` that keeps a copy of the gradients it was given, per step and unit."""

    seen: list[dict[str, list[torch.Tensor | None]]] = []

    def before_step(self, views):
        GradProbe.seen.append({v.name: [None if g is None else g.detach().clone() for g in v.grads] for v in views})
        return super().before_step(views)


class ScoreLog:
    def __init__(self):
        self.__name__ = "score_log"
        self.scores: list[dict[str, float]] = []

    @hookimpl
    def slimfit_step_end(self, step, scores):
        self.scores.append(scores)

    @hookimpl
    def register_scorers(self, register):
        register("grad_probe", GradProbe)


def build(case: str):
    from accelerate import Accelerator
    from accelerate.utils import DeepSpeedPlugin, InitProcessGroupKwargs

    fp16, bf16, stage3 = case.startswith("fp16"), case.startswith("bf16"), "_z3_" in case
    log = ScoreLog()
    config = {"seed": 1, "scheduler": {"name": "ils", "freeze_ratio": 0.5}, "compression": "none",
              "scorer": {"name": "grad_probe" if stage3 else "grad_norm"},
              "lr_scale": 3.0 if case == "lr_raise_once" else 1.0}
    slimfit = SlimFit.from_config(config, plugins=[log])
    model = slimfit.prepare_model(tiny_bert())
    if "two_groups" in case:
        second = [p for n, p in model.named_parameters() if "layer.1." in n or n.startswith("classifier")]
        first = [p for p in model.parameters() if all(p is not q for q in second)]
        groups = [{"params": first}, {"params": second}]
    else:
        groups = [{"params": list(model.parameters())}]
    optimizer = torch.optim.AdamW(groups, lr=LR, weight_decay=0.01)
    zero = {"stage": 3, "stage3_param_persistence_threshold": 0} if stage3 else {"stage": 2}
    if case.endswith("sub_groups"):
        zero["sub_group_size"] = SUB_GROUP_SIZE
    if case.endswith("offload"):
        zero["offload_optimizer"] = {"device": "cpu"}
    ds_config = {
        "train_micro_batch_size_per_gpu": MICRO,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": CLIP,
        "zero_optimization": zero,
        "zero_force_ds_cpu_optimizer": False,
        "fp16": {"enabled": fp16, "initial_scale_power": 10},
        "bf16": {"enabled": bf16},
        "steps_per_print": 10**9,
    }
    handlers = SlimFit.kwargs_handlers() + [InitProcessGroupKwargs(backend="gloo")]
    precision = "fp16" if fp16 else "bf16" if bf16 else "no"
    accelerator = Accelerator(deepspeed_plugin=DeepSpeedPlugin(hf_ds_config=ds_config),
                              mixed_precision=precision, kwargs_handlers=handlers)
    model, optimizer = accelerator.prepare(model, optimizer)
    return slimfit, model, optimizer, accelerator, log


def capture_stepped_grads(zero) -> dict[int, torch.Tensor]:
    """Each ZeRO-3 sub-group's fp32 gradient as DeepSpeed hands it to the basic optimizer
    (unscaled and clipped), copied; cleared by the caller after each step."""
    stepped: dict[int, torch.Tensor] = {}
    optimizer_step = zero._optimizer_step

    def capture(sub_group_id):
        stepped[sub_group_id] = zero.fp32_partitioned_groups_flat[sub_group_id].grad.detach().clone()
        return optimizer_step(sub_group_id)

    zero._optimizer_step = capture
    return stepped


def compare_with_deepspeed(slimfit, zero, seen: dict, stepped: dict) -> tuple[int, list]:
    """Units whose scorer gradient differs from DeepSpeed's gradient of that step: (slices
    compared, [(unit, norm seen / norm DeepSpeed stepped)])."""
    compared, differ = 0, []
    units = {u.name: u for u in slimfit.controller.units.all}
    for name, grads in seen.items():
        seen_sq = stepped_sq = 0.0
        equal = True
        for param, grad in zip(units[name].params, grads):
            if grad is None:
                continue
            sub_group, offset, _ = zero.grad_position[zero.get_param_id(param)]
            want = stepped[sub_group].narrow(0, offset, grad.numel())
            compared += 1
            equal = equal and grad.dtype == want.dtype and torch.equal(grad, want)
            seen_sq += float(grad.double().pow(2).sum())
            stepped_sq += float(want.double().pow(2).sum())
        if not equal:
            differ.append((name, (seen_sq / stepped_sq) ** 0.5 if stepped_sq else None))
    return compared, differ


def run_case(case: str) -> dict:
    slimfit, model, optimizer, accelerator, log = build(case)
    record: dict = {"case": case}
    engine = accelerator.deepspeed_engine_wrapped.engine
    basic = engine.optimizer.optimizer
    stage3 = "_z3_" in case
    stepped = capture_stepped_grads(engine.optimizer) if stage3 else {}
    GradProbe.seen.clear()
    if stage3:
        record.update(sub_groups=len(engine.optimizer.fp16_groups), compared=0, differ=[])
    if case == "lr_raise_once":
        update = basic.step
        seen: list[list[float]] = []

        def flaky_step(*args, **kwargs):  # installed before attach: inside SlimFit's wrapper
            if not seen and not record.get("raised"):
                record["raised"] = True
                raise RuntimeError("out of memory")
            seen.append([group["lr"] for group in basic.param_groups])
            return update(*args, **kwargs)

        basic.step = flaky_step
        record["seen"] = seen
    slimfit.attach(accelerator, model, optimizer, total_steps=STEPS)
    record["lr_after"], record["grad_norms"] = [], []
    micro = 0
    while slimfit.controller.step < STEPS and micro < STEPS + 3:
        try:
            with slimfit.step():
                loss = model(**toy_batch(slimfit.controller.step, accelerator.process_index)).loss
                accelerator.backward(loss)  # DeepSpeed steps here
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
        except RuntimeError as err:  # a loop that skips a batch on out-of-memory
            if "out of memory" not in str(err):
                raise
            record["caught"] = record.get("caught", 0) + 1
        record["lr_after"].append([group["lr"] for group in basic.param_groups])
        record["grad_norms"].append(float(engine.get_global_grad_norm() or 0.0))
        if stage3 and GradProbe.seen:
            compared, differ = compare_with_deepspeed(slimfit, engine.optimizer, GradProbe.seen.pop(), stepped)
            record["compared"] += compared
            record["differ"] += [(micro, *d) for d in differ]
        stepped.clear()
        micro += 1
    record.update(steps=slimfit.controller.step, scores=log.scores, clip=engine.gradient_clipping(),
                  loss_scale=float(accelerator.deepspeed_engine_wrapped.engine.optimizer.loss_scale))
    accelerator.wait_for_everyone()
    slimfit.detach()
    return record


def run_with_fp16_allowed(case: str) -> dict:
    from deepspeed.accelerator import get_accelerator

    accelerator = get_accelerator()
    accelerator.is_fp16_supported = lambda: True  # see precision_worker.run_with_fp16_allowed
    try:
        return run_case(case)
    finally:
        del accelerator.is_fp16_supported


def main() -> None:
    out, cases = Path(sys.argv[1]), sys.argv[2:]
    results = {}
    for case in cases:
        torch.manual_seed(0)
        results[case] = run_with_fp16_allowed(case) if case.startswith("fp16") else run_case(case)
        if "_z3_" in case:  # each rank holds its own slices: every rank's comparison counts
            gathered = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(gathered, (results[case]["compared"], results[case]["differ"]))
            results[case]["compared"] = sum(c for c, _ in gathered)
            results[case]["differ"] = [d for _, ds in gathered for d in ds]
        reset_accelerate()
    if int(os.environ.get("RANK", 0)) == 0:
        out.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    from worker_exit import exit_cleanly

    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
    exit_cleanly()
