"""Top-k pruning: keep the largest ``keep`` fraction of elements by magnitude, zero the rest.

SlimFit stores the normalized output of frozen LayerNorms this way (10%, values + indices). The
reference takes one global top-k over the tensor (``scope: tensor``); the default takes it per
row (per token, ``scope: row``), which keeps every token represented, runs about twice as fast
on CPU, and needs only int16 indices within a row.

YAML: ``compressor: {name: topk, keep: 0.1}`` or ``{name: topk, keep: 0.1, scope: tensor}``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, NamedTuple

import torch

from slimfit_accel.hookspecs import SavedTensorContext, hookimpl


class TopKPacked(NamedTuple):
    values: torch.Tensor  # original dtype
    indices: torch.Tensor  # into the flattened tensor (scope tensor) or within each row (scope row)
    shape: torch.Size
    width: int  # row width for scope row, 0 for scope tensor


@dataclass
class TopK:
    """Keeps the ``keep`` fraction of elements of largest magnitude, per row or over the tensor.

    Example::

        c = TopK(keep=0.1)
        y = c.unpack(c.pack(torch.randn(4, 64), ctx))   # 26 non-zeros
    """

    keep: float = 0.1
    scope: Literal["row", "tensor"] = "row"

    def __post_init__(self) -> None:
        if not 0 < self.keep <= 1:
            raise ValueError(f"topk: keep must be in (0, 1], got {self.keep}")

    def pack(self, tensor: torch.Tensor, ctx: SavedTensorContext | None = None) -> TopKPacked:
        if self.scope == "row" and tensor.dim() >= 1 and tensor.numel():
            rows = tensor.detach().reshape(-1, tensor.shape[-1])
            width = rows.shape[1]
            k = max(1, math.ceil(self.keep * width))
            indices = rows.abs().topk(k, dim=1, sorted=False).indices
            values = rows.gather(1, indices)
            index_dtype = torch.int16 if width < 2**15 else torch.int32
            return TopKPacked(values, indices.to(index_dtype), tensor.shape, width)
        flat = tensor.detach().reshape(-1)
        k = max(1, math.ceil(self.keep * flat.numel())) if flat.numel() else 0
        indices = flat.abs().topk(k, sorted=False).indices
        values = flat[indices].contiguous()
        index_dtype = torch.int32 if flat.numel() < 2**31 else torch.int64
        return TopKPacked(values, indices.to(index_dtype), tensor.shape, 0)

    def unpack(self, packed: TopKPacked) -> torch.Tensor:
        if packed.width:
            out = packed.values.new_zeros(packed.values.shape[0], packed.width)
            return out.scatter_(1, packed.indices.long(), packed.values).reshape(packed.shape)
        out = packed.values.new_zeros(packed.shape.numel())
        out[packed.indices.long()] = packed.values
        return out.reshape(packed.shape)


@hookimpl
def register_compressors(register) -> None:
    register("topk", TopK)
