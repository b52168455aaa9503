"""Worker for the Trainer + DeepSpeed test (torchrun, 2 CPU processes, gloo). Writes one JSON per rank.

The Accelerate loop under DeepSpeed ZeRO-2, the Trainer with the same DeepSpeed config and
``SlimFitCallback`` (checkpoint half-way), and a Trainer resuming from that checkpoint.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"

from trainer_parity import accelerate_run, deepspeed_config, make_data, max_difference, trainer_run  # noqa: E402

STEPS = 4


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--stage", type=int, default=2)
    args = parser.parse_args()

    ds = deepspeed_config(args.stage)
    data = make_data(8 * STEPS * int(os.environ["WORLD_SIZE"]))
    reference, reference_weights = accelerate_run(data, STEPS, deepspeed=ds)
    straight = Path(args.out, "straight")
    decisions, weights, callback = trainer_run(data, STEPS, str(straight), save_steps=STEPS // 2, deepspeed=ds)
    resumed, resumed_weights, _ = trainer_run(
        data, STEPS, str(Path(args.out, "resumed")), resume=str(straight / f"checkpoint-{STEPS // 2}"), deepspeed=ds
    )
    Path(args.out, f"rank{dist.get_rank()}.json").write_text(json.dumps({
        "world": dist.get_world_size(),
        "reference": reference,
        "trainer": decisions,
        "resumed": resumed,
        "trainer_vs_reference": max_difference(weights, reference_weights),
        "resumed_vs_trainer": max_difference(resumed_weights, weights),
        "report_steps": callback.report.steps,
    }))


if __name__ == "__main__":
    from worker_exit import exit_cleanly

    torch.set_num_threads(1)
    main()
    exit_cleanly()
