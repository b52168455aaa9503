"""Resume under every backend: ``accelerator.save_state`` / ``load_state`` with SlimFit on.

Launched by tests/test_resume.py, once per phase, as
``torchrun --nproc_per_node N resume_worker.py PHASE OUT_DIR BACKEND [BACKEND ...]`` (or plain
``python`` for the single process), with DS_ACCELERATOR=cpu. ``fsdp2`` is Accelerate's FSDP2
(each BertLayer and the root sharded) switched on for CPU processes (tests/fsdp_on_cpu.py). Several backends run one after the
other in the same launch (Accelerate's state is reset in between) to save process starts.

* ``straight``: 10 optimizer steps of 2 micro-batches each, saving state at the end of step 5
  (``OUT/BACKEND/at_boundary``) and after the first micro-batch of step 5
  (``OUT/BACKEND/mid_step``), both inside the ``slimfit.step()`` block (units frozen); the run
  goes on unperturbed. Rank 0 writes the decision and
  observer logs and the final fp32 weights.
* ``resume``: a new process loads ``at_boundary`` and trains the last 5 steps, then loads
  ``mid_step`` into the same objects and trains on from micro-batch 1 of step 5. Accelerate
  restores the accumulation position (``accelerator.step``) and the RNG but checkpoints no
  gradients (nor does DeepSpeed), so that run loses micro-batch 0's gradient: its decisions up
  to the step saved in must match, its weights cannot.

The comparisons live in the test; this script records what happened.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from conftest import random_batch, tiny_bert  # noqa: E402
from fsdp_on_cpu import back_to_cpu, fsdp_accelerator  # noqa: E402

from slimfit_accel import SlimFit, hookimpl  # noqa: E402

STEPS, SAVE_AT, ACCUM, MICRO = 10, 5, 2, 4
CONFIG = {"seed": 5, "scheduler": {"name": "ils", "freeze_ratio": 0.75}, "units": {"always_train": ["classifier.*"]}}
LR = 1e-2

#: backend name -> DeepSpeed zero_optimization section (None: no DeepSpeed)
BACKENDS = {
    "single": None,
    "ddp": None,
    "fsdp2": None,
    "zero1": {"stage": 1},
    "zero2": {"stage": 2},
    "zero2_offload": {"stage": 2, "offload_optimizer": {"device": "cpu"}},
    "zero3": {"stage": 3, "stage3_param_persistence_threshold": 0},
}


class DecisionLog:
    """Observer plugin: every announced freeze decision and step end, in order."""

    def __init__(self):
        self.__name__ = "decision_log"
        self.events: list[list] = []

    @hookimpl
    def slimfit_freeze_decision(self, step, trainable, frozen):
        self.events.append(["decision", step, sorted(trainable)])

    @hookimpl
    def slimfit_step_end(self, step, scores):
        self.events.append(["step_end", step])


def build(backend: str):
    from accelerate import Accelerator
    from accelerate.utils import DeepSpeedPlugin, DummyOptim, InitProcessGroupKwargs

    zero = BACKENDS[backend]
    log = DecisionLog()
    slimfit = SlimFit.from_config(CONFIG, plugins=[log])
    model = slimfit.prepare_model(tiny_bert())
    handlers = SlimFit.kwargs_handlers()
    if backend != "single":
        handlers.append(InitProcessGroupKwargs(backend="gloo"))
    if backend == "fsdp2":
        accelerator = fsdp_accelerator(gradient_accumulation_steps=ACCUM, auto_wrap_policy="transformer_based_wrap",
                                       transformer_cls_names_to_wrap=["BertLayer"])
        optimizer = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.1)
    elif zero is None:
        accelerator = Accelerator(cpu=True, gradient_accumulation_steps=ACCUM, kwargs_handlers=handlers)
        optimizer = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.1)
    else:
        offload = "offload_optimizer" in zero
        ds_config = {
            "train_micro_batch_size_per_gpu": MICRO,
            "gradient_accumulation_steps": ACCUM,
            "gradient_clipping": 1.0,
            "zero_optimization": {**zero, "reduce_bucket_size": 2000, "allgather_bucket_size": 2000},
            "optimizer": {"type": "AdamW", "params": {"lr": LR, "weight_decay": 0.1, "torch_adam": not offload}},
            "steps_per_print": 10**9,
        }
        plugin = DeepSpeedPlugin(hf_ds_config=ds_config)
        accelerator = Accelerator(deepspeed_plugin=plugin, gradient_accumulation_steps=ACCUM, kwargs_handlers=handlers)
        optimizer = DummyOptim(model.parameters())
    model, optimizer = accelerator.prepare(model, optimizer)
    slimfit.attach(accelerator, model, optimizer, total_steps=STEPS)
    return slimfit, model, optimizer, accelerator, log


def train(run, first_step: int, last_step: int, on_micro=None, first_micro: int = 0) -> list:
    """Optimizer steps ``first_step..last_step-1`` (the first from micro-batch ``first_micro``);
    returns the decision taken at each."""
    slimfit, model, optimizer, accelerator, _ = run
    rank = accelerator.process_index
    decisions = []
    for step in range(first_step, last_step):
        for micro in range(first_micro if step == first_step else 0, ACCUM):
            with accelerator.accumulate(model), slimfit.step():
                if not decisions or decisions[-1][0] != step:
                    assert slimfit.controller.step == step, (slimfit.controller.step, step)
                    decisions.append([step, list(slimfit.controller.trainable)])
                batch = random_batch(batch=MICRO, seed=10_000 * step + 100 * micro + rank)
                loss = model(**batch).loss
                accelerator.backward(loss)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                if on_micro is not None:  # inside the block: units of this step still frozen
                    on_micro(step, micro)
    return decisions


def full_weights(run) -> dict[str, torch.Tensor]:
    """Every parameter in full fp32 (DeepSpeed: the optimizer's master copy; FSDP2: the shards
    gathered); collective."""
    slimfit, model, optimizer, accelerator, _ = run
    from accelerate.utils import DistributedType

    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        from deepspeed.utils import safe_get_full_fp32_param

        return {n: safe_get_full_fp32_param(p).detach().clone() for n, p in model.module.named_parameters()}
    named = accelerator.unwrap_model(model).named_parameters()
    return {n: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone() for n, p in named}


def record(run, out: Path, name: str, decisions: list, log_start: int = 0, extra: dict | None = None) -> None:
    slimfit, accelerator, log = run[0], run[3], run[4]
    weights = full_weights(run)
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        torch.save({"weights": weights, "scores": slimfit.controller.scores.clone()}, out / f"{name}.pt")
        (out / f"{name}.json").write_text(json.dumps({
            "decisions": decisions,
            "events": log.events[log_start:],
            "controller_step": slimfit.controller.step,
            "world": accelerator.num_processes,
            "distributed_type": str(accelerator.distributed_type),
            **(extra or {}),
        }))
    accelerator.wait_for_everyone()


def straight(backend: str, out: Path) -> None:
    run = build(backend)
    accelerator = run[3]

    def save(step, micro):
        if step == SAVE_AT - 1 and micro == ACCUM - 1:
            accelerator.save_state(str(out / "at_boundary"))
        if step == SAVE_AT and micro == 0:
            accelerator.save_state(str(out / "mid_step"))

    decisions = train(run, 0, STEPS, on_micro=save)
    record(run, out, "straight", decisions)
    write_report(run, out)


def write_report(run, out: Path) -> None:
    """Every rank: the SlimFit report (gathered) and what DeepSpeed itself holds on this rank."""
    slimfit, model, optimizer, accelerator, _ = run
    report = slimfit.report(gather=True)
    held = {}
    engine = getattr(accelerator, "deepspeed_engine_wrapped", None)
    if engine is not None:
        zero = engine.engine.optimizer
        stage3 = type(zero).__name__ == "DeepSpeedZeroOptimizer_Stage3"
        flats = zero.fp32_partitioned_groups_flat if stage3 else zero.single_partition_of_fp32_groups
        module = model.module.parameters()
        held = {
            "stage": engine.engine.zero_optimization_stage(),
            # DeepSpeed's own partitions: parameters (ZeRO-3: ds_tensor), fp32 masters, padding
            "param_bytes": sum((p.ds_tensor if stage3 else p).numel() * 4 for p in module),
            "master_numel": sum(f.numel() for f in flats),
            "padding": (sum(p.padding_size() for group in zero.fp16_groups for p in group) if stage3
                        else sum(zero.groups_padding)),
            "model_numel": sum(p.ds_numel if stage3 else p.numel() for p in model.module.parameters()),
            "moment_bytes": sum(s[k].numel() * s[k].element_size() for s in zero.optimizer.state.values()
                                for k in ("exp_avg", "exp_avg_sq") if k in s),
        }
    (out / f"report_rank{accelerator.process_index}.json").write_text(
        json.dumps({"report": report.to_dict(), "rendered": report.render(), "deepspeed": held}, default=str))
    accelerator.wait_for_everyone()


def resume(backend: str, out: Path) -> None:
    run = build(backend)
    slimfit, accelerator, log = run[0], run[3], run[4]
    accelerator.load_state(str(out / "at_boundary"))
    loaded_step = slimfit.controller.step
    decisions = train(run, loaded_step, STEPS)
    record(run, out, "resumed", decisions)

    # Saved after micro-batch 0 of step SAVE_AT: Accelerate restores the accumulation position
    # (and RNG), not the gradient of micro-batch 0, so the step goes on from micro-batch 1.
    # Loaded with units frozen (as when a decision is applied before load_state): DeepSpeed
    # must not look for them among the checkpoint's frozen parameters, and they stay frozen.
    start = len(log.events)
    frozen = [p for unit in slimfit.units.schedulable[::2] for p in unit.params]
    for param in frozen:
        param.requires_grad_(False)
    accelerator.load_state(str(out / "mid_step"))
    still_frozen = all(not p.requires_grad for p in frozen)
    for param in frozen:
        param.requires_grad_(True)
    decisions = train(run, slimfit.controller.step, STEPS, first_micro=1)
    record(run, out, "resumed_mid", decisions, log_start=start,
           extra={"still_frozen_after_load": still_frozen, "saved_frozen": saved_frozen_parameters(out / "mid_step")})


def saved_frozen_parameters(folder: Path) -> list[str]:
    """Parameters a DeepSpeed checkpoint recorded as frozen (requires_grad off at save time)."""
    states = folder / "pytorch_model" / "mp_rank_00_model_states.pt"
    if not states.exists():
        return []
    return sorted(torch.load(states, map_location="cpu", weights_only=False).get("frozen_param_fragments") or {})


def reset_accelerate() -> None:
    """Let the next backend build a fresh Accelerator in this process (process group kept)."""
    from accelerate.state import AcceleratorState, GradientState

    back_to_cpu()  # after fsdp2: the process's state is MULTI_CPU again
    AcceleratorState._reset_state()
    GradientState._reset_state()
    os.environ.pop("ACCELERATE_USE_DEEPSPEED", None)


def main() -> None:
    phase, out = sys.argv[1], Path(sys.argv[2])
    for backend in sys.argv[3:]:
        torch.manual_seed(0)
        {"straight": straight, "resume": resume}[phase](backend, out / backend)
        reset_accelerate()



if __name__ == "__main__":
    from worker_exit import exit_cleanly

    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
    exit_cleanly()
