"""The compression swaps under DeepSpeed ZeRO-3 (2 processes): decided on empty partitions, exact.

Launched by tests/test_compression_zero3.py as
``torchrun --nproc_per_node 2 zero3_swaps_worker.py OUT.json``. A tiny Gemma (its RMSNorms
compute ``(1 + w) * x_hat``) whose final norm is replaced by ``FakeRMSNorm`` (named and built
like an RMSNorm, computes an L1 normalisation) is wrapped by ZeRO-3, so SlimFit attaches when
every weight is an empty partition. Rank 0 writes: which module classes were swapped, the
largest logit difference between the model with SlimFit attached and without, and the largest
gradient difference between an exact engine (all the swaps, nothing compressed) and none.
"""

from __future__ import annotations

import json
import sys
import traceback
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from test_compression_architectures import batch, build  # noqa: E402

from slimfit_accel import SlimFit, make_accelerator  # noqa: E402
from slimfit_accel.compression import CompressionEngine, CompressionPolicy, installed_compressor_factories  # noqa: E402


class FakeRMSNorm(nn.Module):
    def __init__(self, n: int):
        super().__init__()
        self.weight, self.eps = nn.Parameter(1 + torch.randn(n)), 1e-6

    def forward(self, x):
        return self.weight * x / (x.abs().mean(-1, keepdim=True) + self.eps)


def build_model() -> nn.Module:
    model = build("gemma").eval()  # no dropout: every forward the same
    model.model.norm = FakeRMSNorm(model.config.hidden_size)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.add_(torch.randn_like(param))  # Gemma's start at 0, where w and 1 + w differ most
    return model


def full_grads(model) -> dict[str, torch.Tensor]:
    from deepspeed.utils import safe_get_full_grad

    return {n: safe_get_full_grad(p).clone() for n, p in model.module.named_parameters()}


def forward_backward(model, accelerator, inputs):
    out = model(**inputs)
    accelerator.backward(out.loss)
    return out.logits.detach().clone(), full_grads(model)


def run() -> dict:
    from accelerate.utils import DeepSpeedPlugin, DummyOptim

    torch.manual_seed(0)
    slimfit = SlimFit.from_config({"seed": 0, "scheduler": {"name": "ils", "freeze_ratio": 0.5}, "compression": "slimfit"})
    model = slimfit.prepare_model(build_model())
    ds_config = {
        "train_micro_batch_size_per_gpu": 4,
        "gradient_accumulation_steps": 1,
        "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
        "optimizer": {"type": "AdamW", "params": {"lr": 0.0, "weight_decay": 0.0, "torch_adam": True}},
        "steps_per_print": 10**9,
    }
    accelerator = make_accelerator(deepspeed_plugin=DeepSpeedPlugin(hf_ds_config=ds_config))
    model, optimizer = accelerator.prepare(model, DummyOptim(model.parameters()))
    assert all(p.numel() == 0 for p in model.module.parameters()), "ZeRO-3 did not partition every weight"
    inputs = batch("gemma")

    logits, grads = forward_backward(model, accelerator, inputs)  # nothing attached: the reference
    optimizer.step()
    optimizer.zero_grad()

    # what a training loop does: SlimFit attached after accelerator.prepare, partitions empty
    slimfit.attach(accelerator, model, optimizer, total_steps=1)
    swapped = sorted({type(m).__name__ for m in model.module.modules() if "_slimfit_swap" in m.__dict__})
    with slimfit.step():
        out = model(**inputs)
        accelerator.backward(out.loss)
    slimfit_logits = out.logits.detach()
    optimizer.step()
    optimizer.zero_grad()
    slimfit.detach()

    # the swaps on their own, nothing compressed: gradients as without them
    exact = CompressionEngine(model.module, CompressionPolicy(), compressors=installed_compressor_factories()).attach()
    with exact.step():
        exact_logits, exact_grads = forward_backward(model, accelerator, inputs)
    exact_swapped = sorted({type(m).__name__ for m in model.module.modules() if "_slimfit_swap" in m.__dict__})
    exact.detach()
    return {
        "world": accelerator.num_processes,
        "swapped": swapped,
        "exact_swapped": exact_swapped,
        "slimfit_logits_diff": (slimfit_logits - logits).abs().max().item(),
        "logits_scale": logits.abs().max().item(),
        "exact_logits_diff": (exact_logits - logits).abs().max().item(),
        "grad_diff": {n: (exact_grads[n] - g).abs().max().item() / max(g.abs().max().item(), 1e-12) for n, g in grads.items()},
    }


def main() -> None:
    out = Path(sys.argv[1])
    try:
        result = run()
    except Exception as exc:  # recorded, so the test shows it
        result = {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()}
    if torch.distributed.is_initialized() and torch.distributed.get_rank() != 0:
        return
    out.write_text(json.dumps(result))


if __name__ == "__main__":
    main()
