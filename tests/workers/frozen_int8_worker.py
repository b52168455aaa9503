"""Worker for the 2-process ``frozen_weights: int8`` test (run with torchrun). One JSON per rank.

A tiny Llama trained 8 optimizer steps under DDP (AdamW with weight decay, gradient accumulation
2, Accelerate's bf16 autocast) with ``frozen_weights: int8`` and ``master_weights: host`` (ILS
freeze_ratio 0.5, no compression); then the plain reference (``tests/frozen_int8_reference.py``:
frozen matrices as their dequantised int8 rounding, trained ones as their masters) under the same
DDP, with SlimFit's decisions. Masters, codes and AdamW state are compared bit for bit, and a
checksum of the masters and codes lets the test compare the ranks.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from frozen_int8_reference import ReferenceInt8, int8_rounding  # noqa: E402
from mixed_precision_reference import LR, WEIGHT_DECAY, lm_batch, tiny_llama, trained_names  # noqa: E402

from slimfit_accel import SlimFit, make_accelerator  # noqa: E402
from slimfit_accel.frozen_int8 import stored_weight  # noqa: E402

STEPS, ACCUM = 8, 2
CONFIG = {"scheduler": {"name": "ils", "freeze_ratio": 0.5}, "compression": "none", "optimizer_paging": True,
          "memory_meter": "always", "master_weights": "host", "frozen_weights": "int8"}


def main(out: Path) -> None:
    accelerator = make_accelerator(gradient_accumulation_steps=ACCUM, mixed_precision="bf16")
    slimfit = SlimFit.from_config(CONFIG)
    model = slimfit.prepare_model(tiny_llama())
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=WEIGHT_DECAY)
    model, optimizer = accelerator.prepare(model, optimizer)
    slimfit.attach(accelerator, model, optimizer)
    decisions = []
    for micro in range(STEPS * ACCUM):
        with accelerator.accumulate(model), slimfit.step():
            if micro % ACCUM == 0:
                decisions.append(trained_names(model))
            accelerator.backward(model(**lm_batch(seed=1000 * accelerator.process_index + micro)).loss)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    named = list(accelerator.unwrap_model(model).named_parameters())
    stored = {name for name, p in named if stored_weight(p) is not None}

    reference_accelerator = make_accelerator(gradient_accumulation_steps=ACCUM, mixed_precision="bf16")
    reference = ReferenceInt8(tiny_llama(), stored, mixed=True)
    reference.model = reference.mixed.model = reference_accelerator.prepare(reference.model)
    for micro in range(STEPS * ACCUM):
        with reference_accelerator.accumulate(reference.model):
            if micro % ACCUM == 0:
                reference.prepare(decisions[micro // ACCUM])
            reference_accelerator.backward(reference.model(**lm_batch(seed=1000 * reference_accelerator.process_index + micro)).loss)
            if reference_accelerator.sync_gradients:
                reference.step()

    inner = optimizer.optimizer
    masters = {name: slimfit.master_weights.of(p).host for name, p in named}
    digest = hashlib.sha1()
    masters_equal = codes_equal = state_equal = True
    for index, (name, param) in enumerate(named):
        masters_equal &= torch.equal(masters[name], reference.master(name))
        digest.update(masters[name].numpy().tobytes())
        if name in stored:
            codes, scales = int8_rounding(reference.master(name))
            codes_equal &= torch.equal(stored_weight(param).codes, codes) and torch.equal(stored_weight(param).scales, scales)
            digest.update(stored_weight(param).codes.numpy().tobytes())
        mine, theirs = inner.state.get(param, {}), reference.optimizer.state.get(reference.mixed.masters[index], {})
        state_equal &= mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in theirs)
    result = {
        "world": dist.get_world_size(), "stored": len(stored), "changing": len({frozenset(d) for d in decisions}) > 1,
        "masters_equal": bool(masters_equal), "codes_equal": bool(codes_equal), "state_equal": bool(state_equal),
        "checksum": digest.hexdigest(),
    }
    (out / f"rank{dist.get_rank()}.json").write_text(json.dumps(result))


if __name__ == "__main__":
    from worker_exit import exit_cleanly

    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    main(Path(parser.parse_args().out))
    exit_cleanly()
