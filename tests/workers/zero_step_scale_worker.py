"""What scorers and the optimizer see of scale under DeepSpeed ZeRO-2, 2 CPU processes.

Launched by tests/test_zero_step_scale.py as
``torchrun --nproc_per_node 2 zero_step_scale_worker.py OUT.json CASE [CASE ...]``; the cases
run one after the other (Accelerate's state reset in between). A tiny BERT trains for STEPS
optimizer steps on the precision worker's toy task, the same data in every case.

* ``fp16_one_group``, ``fp16_two_groups``, ``fp16_two_groups_offload``: fp16 with dynamic loss
  scaling (the CPU capability check lifted, as in precision_worker.py), gradient clipping, the
  ``grad_norm`` scorer, a torch AdamW with the parameters in one group or split into two
  identical groups (second: encoder layer 1 and the classifier). How parameters are grouped
  changes nothing in training, so the scores must not change either. Records the scores
  ``slimfit_step_end`` reported each step.
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

STEPS, MICRO, LR = 5, 8, 3e-3


class ScoreLog:
    def __init__(self):
        self.__name__ = "score_log"
        self.scores: list[dict[str, float]] = []

    @hookimpl
    def slimfit_step_end(self, step, scores):
        self.scores.append(scores)


def build(case: str):
    from accelerate import Accelerator
    from accelerate.utils import DeepSpeedPlugin, InitProcessGroupKwargs

    fp16 = case.startswith("fp16")
    log = ScoreLog()
    config = {"seed": 1, "scheduler": {"name": "ils", "freeze_ratio": 0.5}, "compression": "none",
              "scorer": {"name": "grad_norm"}, "lr_scale": 3.0 if case == "lr_raise_once" else 1.0}
    slimfit = SlimFit.from_config(config, plugins=[log])
    model = slimfit.prepare_model(tiny_bert())
    if "two_groups" in case:
        second = [p for n, p in model.named_parameters() if "layer.1." in n or n.startswith("classifier")]
        first = [p for p in model.parameters() if all(p is not q for q in second)]
        groups = [{"params": first}, {"params": second}]
    else:
        groups = [{"params": list(model.parameters())}]
    optimizer = torch.optim.AdamW(groups, lr=LR, weight_decay=0.01)
    zero = {"stage": 2}
    if case.endswith("offload"):
        zero["offload_optimizer"] = {"device": "cpu"}
    ds_config = {
        "train_micro_batch_size_per_gpu": MICRO,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": 1.0,
        "zero_optimization": zero,
        "zero_force_ds_cpu_optimizer": False,
        "fp16": {"enabled": fp16, "initial_scale_power": 10},
        "steps_per_print": 10**9,
    }
    handlers = SlimFit.kwargs_handlers() + [InitProcessGroupKwargs(backend="gloo")]
    accelerator = Accelerator(deepspeed_plugin=DeepSpeedPlugin(hf_ds_config=ds_config),
                              mixed_precision="fp16" if fp16 else "no", kwargs_handlers=handlers)
    model, optimizer = accelerator.prepare(model, optimizer)
    return slimfit, model, optimizer, accelerator, log


def run_case(case: str) -> dict:
    slimfit, model, optimizer, accelerator, log = build(case)
    record: dict = {"case": case}
    basic = accelerator.deepspeed_engine_wrapped.engine.optimizer.optimizer
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
    record["lr_after"] = []
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
        micro += 1
    record.update(steps=slimfit.controller.step, scores=log.scores,
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
        reset_accelerate()
    if int(os.environ.get("RANK", 0)) == 0:
        out.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    from worker_exit import exit_cleanly

    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
    exit_cleanly()
