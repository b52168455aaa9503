"""Worker for 2-process DDP tests (run with torchrun). Writes one JSON per rank.

Each rank sees different data. Per optimizer step it records the trained units, whether the
frozen units' weights and optimizer state stayed bit-identical, and whether trained ones moved.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from accelerate import Accelerator

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from conftest import random_batch, tiny_bert  # noqa: E402
from freeze_checks import frozen_and_trained, snapshot, unchanged  # noqa: E402

from slimfit_accel import SlimFit, hookimpl  # noqa: E402


class RankNoiseScorer:
    """Scores that differ by rank on purpose: the controller must still make ranks agree."""

    def before_step(self, views):
        return None

    def after_step(self, views, carried):
        return torch.rand(len(views), dtype=torch.float64) + 10.0 * dist.get_rank()


class RankNoisePlugin:
    @hookimpl
    def register_scorers(self, register):
        register("rank_noise", RankNoiseScorer)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--optimizer", default="adamw")
    parser.add_argument("--config", default="{}")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--accum", type=int, default=2)
    args = parser.parse_args()

    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=args.accum, kwargs_handlers=SlimFit.kwargs_handlers())
    rank = accelerator.process_index
    torch.manual_seed(rank)  # different local randomness per rank
    slimfit = SlimFit.from_config(json.loads(args.config), plugins=[RankNoisePlugin()])
    model = slimfit.prepare_model(tiny_bert(layers=3))
    if args.optimizer == "adamw":
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    else:
        optimizer = torch.optim.SGD(model.parameters(), lr=1e-2, momentum=0.9, weight_decay=0.1)
    model, optimizer = accelerator.prepare(model, optimizer)
    slimfit.attach(accelerator, model, optimizer)
    inner = optimizer.optimizer
    steps = []
    for micro in range(args.steps * args.accum):
        with accelerator.accumulate(model), slimfit.step():
            if micro % args.accum == 0:
                frozen, trained = frozen_and_trained(slimfit)
                decided = list(slimfit.controller.trainable)
                before_frozen, before_trained = snapshot(frozen, inner), snapshot(trained, inner)
            batch = random_batch(seed=1000 * rank + micro)  # ranks see different data
            loss = model(**batch).loss
            accelerator.backward(loss)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        if accelerator.sync_gradients:
            steps.append(
                {
                    "trainable": decided,
                    "frozen_unchanged": unchanged(frozen, inner, before_frozen),
                    "frozen_grads_none": all(p.grad is None for p in frozen),
                    "trained_moved": sum(not torch.equal(p.detach(), w) for p, (w, _) in zip(trained, before_trained)),
                    "n_trained_params": len(trained),
                    "n_frozen_params": len(frozen),
                }
            )
    # weights must also agree across ranks (DDP): compare a checksum
    checksum = float(sum(p.detach().double().sum() for p in model.parameters()))
    Path(args.out, f"rank{rank}.json").write_text(json.dumps({"steps": steps, "checksum": checksum, "world": accelerator.num_processes}))


if __name__ == "__main__":
    from worker_exit import exit_cleanly

    main()
    exit_cleanly()
