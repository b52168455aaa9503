"""Top-k pruning: keep the largest ``keep`` fraction of elements by magnitude, zero the rest.

SlimFit stores the normalized output of frozen LayerNorms this way (10%, one global top-k over
the tensor, values + indices). Indices are int32 when the tensor allows it.

YAML: ``compressor: {name: topk, keep: 0.1}``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch

from slimfit_accel.hookspecs import SavedTensorContext, hookimpl


class TopKPacked(NamedTuple):
    values: torch.Tensor  # original dtype
    indices: torch.Tensor  # int32 (int64 past 2**31 elements), into the flattened tensor
    shape: torch.Size


@dataclass
class TopK:
    """Keeps ``ceil(keep * numel)`` elements of largest magnitude (one global top-k).

    Example::

        c = TopK(keep=0.1)
        y = c.unpack(c.pack(torch.randn(4, 64), ctx))   # 26 non-zeros
    """

    keep: float = 0.1

    def __post_init__(self) -> None:
        if not 0 < self.keep <= 1:
            raise ValueError(f"topk: keep must be in (0, 1], got {self.keep}")

    def pack(self, tensor: torch.Tensor, ctx: SavedTensorContext | None = None) -> TopKPacked:
        flat = tensor.detach().reshape(-1)
        k = max(1, math.ceil(self.keep * flat.numel())) if flat.numel() else 0
        indices = flat.abs().topk(k, sorted=False).indices
        values = flat[indices].contiguous()
        index_dtype = torch.int32 if flat.numel() < 2**31 else torch.int64
        return TopKPacked(values, indices.to(index_dtype), tensor.shape)

    def unpack(self, packed: TopKPacked) -> torch.Tensor:
        out = packed.values.new_zeros(packed.shape.numel())
        out[packed.indices.long()] = packed.values
        return out.reshape(packed.shape)


@hookimpl
def register_compressors(register) -> None:
    register("topk", TopK)
