"""Worker for the 2-process Trainer test (run with torchrun, CPU, gloo). Writes one JSON per rank.

Runs the Accelerate loop (``make_accelerator``), the Trainer with ``SlimFitCallback`` saving a
checkpoint half-way, and a second Trainer resuming from that checkpoint; records each run's
freeze decisions, how far its final weights are from the Accelerate loop's, and the world size.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent))

from trainer_parity import accelerate_run, make_data, max_difference, trainer_run  # noqa: E402

STEPS = 4


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    args = parser.parse_args()

    world = int(__import__("os").environ["WORLD_SIZE"])
    data = make_data(8 * STEPS * world)  # per rank: STEPS optimizer steps of 2 micro-batches of 4
    reference, reference_weights = accelerate_run(data, STEPS)
    rank, world_seen = dist.get_rank(), dist.get_world_size()
    decisions, weights, callback = trainer_run(data, STEPS, str(Path(args.out, "straight")), save_steps=STEPS // 2)
    resumed, resumed_weights, _ = trainer_run(
        data, STEPS, str(Path(args.out, "resumed")), resume=str(Path(args.out, "straight", f"checkpoint-{STEPS // 2}"))
    )
    checksum = float(sum(w.double().sum() for w in weights.values()))
    Path(args.out, f"rank{rank}.json").write_text(json.dumps({
        "world": world_seen,
        "reference": reference,
        "trainer": decisions,
        "resumed": resumed,
        "trainer_vs_reference": max_difference(weights, reference_weights),
        "resumed_vs_trainer": max_difference(resumed_weights, weights),
        "report_steps": callback.report.steps,
        "checksum": checksum,
    }))


if __name__ == "__main__":
    from worker_exit import exit_cleanly

    torch.set_num_threads(1)
    main()
    exit_cleanly()
