"""Byte counters for saved activations: what autograd would keep, what we keep instead.

Counts are exact sizes of tensors (``numel * element_size``), not allocator estimates, so they
mean the same on every device. "Live" bytes fall when autograd frees a saved tensor (after
backward, or when the graph is dropped); the peaks are the largest live totals within the step.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Callable

import torch


def tensor_bytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


def packed_bytes(packed: Any) -> int:
    """Total bytes of the tensors inside a packed object (tuples, lists, dicts, dataclasses)."""
    if isinstance(packed, torch.Tensor):
        return tensor_bytes(packed)
    if isinstance(packed, (tuple, list)):
        return sum(packed_bytes(item) for item in packed)
    if isinstance(packed, dict):
        return sum(packed_bytes(item) for item in packed.values())
    if dataclasses.is_dataclass(packed) and not isinstance(packed, type):
        return sum(packed_bytes(getattr(packed, f.name)) for f in dataclasses.fields(packed))
    return 0


@dataclass
class StepStats:
    """Saved-activation bytes of one step (parameters excluded; a tensor saved twice counts once).

    ``raw_bytes``: what autograd would have kept without compression. ``packed_bytes``: what the
    engine kept instead (uncompressed tensors count at full size). ``peak_*``: the largest live
    totals within the step. ``by_compressor``: ``name -> [raw, packed]`` (``-`` = kept as is
    because not floating point or below the policy's ``min_numel`` or ``min_ndim``).
    """

    raw_bytes: int = 0
    packed_bytes: int = 0
    peak_raw_bytes: int = 0
    peak_packed_bytes: int = 0
    tensors: int = 0
    by_compressor: dict[str, list[int]] = field(default_factory=dict)

    @property
    def ratio(self) -> float:
        """raw / packed (1.0 when nothing was saved)."""
        return self.raw_bytes / self.packed_bytes if self.packed_bytes else 1.0


class ByteCounter:
    """Running totals; the engine adds on pack and a packed holder releases when freed.

    ``listeners`` are called with no arguments after every ``add`` (live totals only grow
    there), e.g. by ``slimfit_accel.memory.MemoryMeter`` to follow the peak of all categories.
    """

    def __init__(self) -> None:
        self.live_raw = 0
        self.live_packed = 0
        self.step = StepStats()
        self.listeners: list[Callable[[], None]] = []

    def new_step(self) -> StepStats:
        """Start a new step (peaks start from what is still live) and return the finished one."""
        finished = self.step
        self.step = StepStats(peak_raw_bytes=self.live_raw, peak_packed_bytes=self.live_packed)
        return finished

    def add(self, name: str, raw: int, packed: int) -> None:
        step = self.step
        self.live_raw += raw
        self.live_packed += packed
        step.raw_bytes += raw
        step.packed_bytes += packed
        step.tensors += 1
        pair = step.by_compressor.setdefault(name, [0, 0])
        pair[0] += raw
        pair[1] += packed
        if self.live_raw > step.peak_raw_bytes:
            step.peak_raw_bytes = self.live_raw
        if self.live_packed > step.peak_packed_bytes:
            step.peak_packed_bytes = self.live_packed
        for listener in self.listeners:
            listener()

    def release(self, raw: int, packed: int) -> None:
        self.live_raw -= raw
        self.live_packed -= packed
