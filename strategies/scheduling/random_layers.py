"""``random_layers``: LISA-style layerwise sampling. Train n random blocks, resampled every K steps.

Units outside the transformer blocks (embeddings, head) train every step, as in LISA, unless
``train_outside_blocks`` is false. The draw depends only on (seed, step // interval).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from slimfit_accel.hookspecs import ScheduleContext, hookimpl
from slimfit_accel.rng import derived_generator


@dataclass
class RandomLayers:
    """Train ``n_blocks`` random transformer blocks, switching every ``interval`` steps."""

    n_blocks: int = 2
    interval: int = 20
    train_outside_blocks: bool = True

    def __post_init__(self) -> None:
        if self.n_blocks < 1:
            raise ValueError(f"n_blocks must be at least 1, got {self.n_blocks}")
        if self.interval < 1:
            raise ValueError(f"interval must be at least 1, got {self.interval}")

    def select(self, ctx: ScheduleContext) -> list[str]:
        blocks = sorted({u.block for u in ctx.units if u.block is not None})
        if not blocks:
            raise ValueError("the model has no transformer blocks to sample (no repeated ModuleList found)")
        generator = derived_generator(ctx.seed, ctx.step // self.interval)
        order = torch.randperm(len(blocks), generator=generator).tolist()
        chosen = {blocks[i] for i in order[: self.n_blocks]}
        return [
            u.name
            for u in ctx.units
            if (u.block in chosen) or (u.block is None and self.train_outside_blocks)
        ]


@hookimpl
def register_schedulers(register):
    register("random_layers", RandomLayers)
