"""Two-process DeepSpeed ZeRO run that freezes a changing set of tensors every step.

Launched by tests/test_deepspeed_freezing.py as
``torchrun --nproc_per_node 2 zero_freeze_worker.py CONFIG OUT.json [--no-backend]`` with
DS_ACCELERATOR=cpu. The engine is built with everything trainable; each step freezes a set (the
same on both ranks) with requires_grad=False + ZeroStepBackend.set_frozen, each rank trains on
its own batch, and rank 0 writes what it checked to OUT.json:

* frozen parameters: module weight (gathered under ZeRO-3), fp32 master and every optimizer
  state tensor are bit-identical across the step;
* trainable parameters changed, and match a per-tensor torch reference (same data, gradients
  averaged over ranks, frozen gradients None, same clipping) within float tolerance;
* the backend's per-parameter step counts, and its views (weights/grads summed over ranks).
"""

from __future__ import annotations

import copy
import json
import os
import sys

import torch

CONFIGS = {
    # name: (zero stage, optimizer, offload optimizer, offload params)
    "z1_torch_adamw": (1, "torch_adamw", False, False),
    "z2_fused_adamw": (2, "fused_adamw", False, False),
    "z3_torch_adamw": (3, "torch_adamw", False, False),
    "z2_offload_cpuadam": (2, "cpu_adam", True, False),
    "z3_offload_cpuadam": (3, "cpu_adam", True, True),
    "z2_sgd_momentum": (2, "sgd", False, False),
    "z2_torch_adamw": (2, "torch_adamw", False, False),
    "z2_bf16_torch_adamw": (2, "torch_adamw", False, False),  # bf16 module, fp32 master
}
STEPS = 4
LR, WD, CLIP = 2e-2, 0.1, 0.5
IN, HIDDEN, MID, OUT = 17, 37, 29, 5  # odd sizes: partitions split tensors across the two ranks


def build_model():
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(IN, HIDDEN), torch.nn.LayerNorm(HIDDEN), torch.nn.GELU(),
        torch.nn.Linear(HIDDEN, MID), torch.nn.Tanh(), torch.nn.Linear(MID, OUT),
    )


def param_groups(model):
    """Two groups (decay / no decay), as most recipes build them: ZeRO then has two flat tensors."""
    decay = [p for n, p in model.named_parameters() if n.endswith("weight") and p.dim() > 1]
    rest = [p for n, p in model.named_parameters() if not (n.endswith("weight") and p.dim() > 1)]
    return [{"params": decay, "weight_decay": WD}, {"params": rest, "weight_decay": 0.0}]


def batch(step, rank):
    generator = torch.Generator().manual_seed(1000 * step + rank)
    return torch.randn(8, IN, generator=generator), torch.randint(0, OUT, (8,), generator=generator)


def frozen_names(step, names):
    """Two thirds frozen each step, a different set every step, so step counts diverge."""
    return {name for i, name in enumerate(names) if (i + step) % 3 != 0}


def main():
    config_name, out_path = sys.argv[1], sys.argv[2]
    use_backend = "--no-backend" not in sys.argv
    stage, opt_kind, offload_opt, offload_param = CONFIGS[config_name]
    bf16 = "bf16" in config_name

    import deepspeed
    import deepspeed.comm as dist
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    from slimfit_accel.integrations.deepspeed import ZeroStepBackend

    deepspeed.init_distributed(dist_backend="gloo")
    rank, world = dist.get_rank(), dist.get_world_size()

    model = build_model()
    reference = copy.deepcopy(model)
    zero = {"stage": stage}
    if stage in (1, 2):
        zero.update(reduce_bucket_size=1000, allgather_bucket_size=1000)
    if stage == 3:
        zero.update(stage3_param_persistence_threshold=0, stage3_prefetch_bucket_size=1000)
    if offload_opt:
        zero["offload_optimizer"] = {"device": "cpu"}
    if offload_param:
        zero["offload_param"] = {"device": "cpu"}
    ds_config = {
        "train_micro_batch_size_per_gpu": 8,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": CLIP,
        "zero_optimization": zero,
        "steps_per_print": 10**9,
        "bf16": {"enabled": bf16},
    }
    client_optimizer = None
    if opt_kind == "sgd":
        client_optimizer = torch.optim.SGD(param_groups(model), lr=LR, momentum=0.9)
        ds_config["zero_allow_untested_optimizer"] = True
        ref_opt = torch.optim.SGD(param_groups(reference), lr=LR, momentum=0.9)
    else:
        params = {"lr": LR, "weight_decay": WD, "betas": [0.9, 0.999], "eps": 1e-8}
        if opt_kind == "torch_adamw":
            params["torch_adam"] = True
        ds_config["optimizer"] = {"type": "AdamW", "params": params}
        ref_opt = torch.optim.AdamW(param_groups(reference), lr=LR, betas=(0.9, 0.999), eps=1e-8)

    engine, *_ = deepspeed.initialize(
        model=model, optimizer=client_optimizer,
        model_parameters=param_groups(model) if client_optimizer is None else None, config=ds_config,
    )
    names = [n for n, _ in engine.module.named_parameters()]
    params = dict(engine.module.named_parameters())
    ref_params = dict(reference.named_parameters())
    report = {
        "config": config_name, "backend": use_backend, "bf16": bf16,
        "basic_optimizer": type(engine.optimizer.optimizer).__name__, "steps": [],
    }

    backend = ZeroStepBackend(engine) if use_backend else None
    seen = {}

    def before_step():
        views = backend.views([(n, [params[n]]) for n in names])
        seen["before"] = {
            v.name: [float(v.weights[0].double().pow(2).sum()), v.weights[0].numel(),
                     float(v.grads[0].double().pow(2).sum()) if v.grads[0] is not None else float("nan")]
            for v in views
        }

    def after_step():
        seen["after_called"] = seen.get("after_called", 0) + 1

    if backend is not None:
        backend.install(before_step, after_step)

    def snapshot():
        """Full weight, fp32 master and optimizer state of every parameter (collective calls)."""
        out = {}
        for name in names:
            p = params[name]
            with deepspeed.zero.GatheredParameters([p], enabled=stage == 3):
                weight = p.detach().clone()
            entry = {"weight": weight, "fp32": safe_get_full_fp32_param(p).clone()}
            state = engine.optimizer.optimizer.state if use_backend else {}
            # (Without the backend, DeepSpeed links only the first group's state to its
            # parameters, so safe_get_full_optimizer_state fails for the others: weights only.)
            for key in ("exp_avg", "exp_avg_sq", "momentum_buffer"):
                if any(key in s for s in state.values()):
                    entry[key] = safe_get_full_optimizer_state(p, key).clone()
            out[name] = entry
        return out

    expected_counts = dict.fromkeys(names, 0)
    for step in range(STEPS):
        frozen = frozen_names(step, names)
        before = snapshot()

        for name in frozen:
            params[name].requires_grad_(False)
        if backend is not None:
            backend.set_frozen([params[n] for n in frozen])
        x, y = batch(step, rank)
        loss = torch.nn.functional.cross_entropy(engine(x.to(torch.bfloat16) if bf16 else x).float(), y)
        engine.backward(loss)
        engine.step()
        for name in frozen:
            params[name].requires_grad_(True)

        # Reference: per-tensor torch optimizer, frozen gradients None, mean over both ranks' data.
        ref_opt.zero_grad(set_to_none=True)
        for name in frozen:
            ref_params[name].requires_grad_(False)
        for r in range(world):
            xr, yr = batch(step, r)
            (torch.nn.functional.cross_entropy(reference(xr), yr) / world).backward()
        for name in frozen:
            ref_params[name].requires_grad_(True)
        ref_grad_sq = {n: float(p.grad.double().pow(2).sum())
                       for n, p in ref_params.items() if p.grad is not None}
        ref_weight_sq = {n: float(p.detach().double().pow(2).sum()) for n, p in ref_params.items()}
        total = torch.nn.utils.clip_grad_norm_([p for p in ref_params.values() if p.grad is not None], CLIP)
        clip_coef = min(1.0, CLIP / (float(total) + 1e-6))
        ref_opt.step()

        after = snapshot()
        for name in names:
            if name not in frozen:
                expected_counts[name] += 1

        record = {"step": step, "frozen": sorted(frozen), "clip_coef": clip_coef,
                  "frozen_moved": [], "state_moved": [], "trainable_unchanged": [], "ref_mismatch": {}}
        for name in names:
            b, a = before[name], after[name]
            if name in frozen:
                for key in ("weight", "fp32"):
                    if not torch.equal(b[key], a[key]):
                        record["frozen_moved"].append(f"{name}:{key}")
                for key in ("exp_avg", "exp_avg_sq", "momentum_buffer"):
                    if key in a and not torch.equal(b.get(key, torch.zeros_like(a[key])), a[key]):
                        record["state_moved"].append(f"{name}:{key}")
            elif torch.equal(b["weight"], a["weight"]):
                record["trainable_unchanged"].append(name)
            # (bf16: a bf16 forward is no match for the fp32 reference; freezing is checked above.)
            diff = float((a["weight"].float() - ref_params[name].detach()).abs().max())
            if not bf16 and not torch.allclose(a["weight"], ref_params[name].detach(), rtol=1e-4, atol=1e-5):
                record["ref_mismatch"][name] = diff

        if backend is not None:
            local = torch.tensor([seen["before"][n] for n in names], dtype=torch.float64)
            local[:, 2] = torch.nan_to_num(local[:, 2], nan=0.0)
            dist.all_reduce(local)
            record["views"] = {
                n: {"weight_sq": float(local[i, 0]), "numel": int(local[i, 1]),
                    "grad_sq": float(local[i, 2]) if n not in frozen else None,
                    "ref_weight_sq": ref_weight_sq[n], "ref_numel": ref_params[n].numel(),
                    "ref_grad_sq": ref_grad_sq.get(n)}
                for i, n in enumerate(names)
            }
        report["steps"].append(record)

    if backend is not None:
        report["after_step_calls"] = seen.get("after_called", 0)
        report["counts"] = backend.state_dict()["param_steps"]
        report["expected_counts"] = expected_counts
        # A resumed backend continues the counts.
        fresh = ZeroStepBackend(engine)
        fresh.load_state_dict(backend.state_dict())
        report["resumed_counts_match"] = fresh.state_dict() == backend.state_dict()
        backend.remove()
        wrapped = (engine.optimizer, engine.optimizer.optimizer)
        report["removed_cleanly"] = all("step" not in vars(o) for o in wrapped)
    else:
        report["stage0_refusal"] = stage0_refusal(deepspeed, ds_config)

    if rank == 0:
        with open(out_path, "w") as f:
            json.dump(report, f, indent=1)
    dist.barrier()


def stage0_refusal(deepspeed, ds_config):
    """Without ZeRO there is no flat partition to step: the backend must say so, not misbehave."""
    from slimfit_accel.errors import IntegrationError
    from slimfit_accel.integrations.deepspeed import ZeroStepBackend

    model = build_model()
    config = {**ds_config, "zero_optimization": {"stage": 0}}
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=config)
    try:
        ZeroStepBackend(engine)
    except IntegrationError as error:
        return str(error)
    return None



if __name__ == "__main__":
    from worker_exit import exit_cleanly

    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    main()
    exit_cleanly()
