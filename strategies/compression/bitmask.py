"""``bitmask``: a tensor whose entries are all 0 or one value c (a dropout mask), one bit each.

Dropout saves its mask for backward: bool on CUDA, but on CPU a float tensor of 0 and
1 / (1 - p), 4 bytes an element. Stored as bits plus c it takes 1/32 of that, exactly. A tensor
that is not such a mask is kept as it is, so the rule can never corrupt a gradient.

YAML: ``compressor: {name: bitmask}`` (the default policy uses it for ``*Dropout*`` modules).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch

from slimfit_accel.hookspecs import SavedTensorContext, hookimpl

_BIT_WEIGHTS = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8)


class BitmaskPacked(NamedTuple):
    bits: torch.Tensor  # uint8, 8 entries a byte (zero-padded at the end)
    value: torch.Tensor  # the one non-zero value c, in the original dtype
    shape: torch.Size


@dataclass
class Bitmask:
    """Exact one-bit storage of 0/c masks; anything else passes through unchanged."""

    def pack(self, tensor: torch.Tensor, ctx: SavedTensorContext | None = None) -> BitmaskPacked | torch.Tensor:
        flat = tensor.detach().reshape(-1)
        if flat.numel() == 0:
            return tensor
        nonzero = flat != 0
        value = flat.abs().amax() if flat.dtype != torch.bool else torch.ones((), dtype=torch.bool, device=flat.device)
        value = torch.where(nonzero.any(), flat[nonzero.to(torch.int8).argmax()], value)
        if not bool((flat == value).logical_or_(~nonzero).all()):  # not a 0/c mask: keep it
            return tensor
        pad = (-flat.numel()) % 8
        bits = torch.nn.functional.pad(nonzero.to(torch.uint8), (0, pad)).reshape(-1, 8)
        packed = (bits * _BIT_WEIGHTS.to(bits.device)).sum(dim=1, dtype=torch.uint8)
        return BitmaskPacked(packed, value.to(tensor.dtype).clone(), tensor.shape)

    def unpack(self, packed: BitmaskPacked | torch.Tensor) -> torch.Tensor:
        if isinstance(packed, torch.Tensor):
            return packed
        numel = packed.shape.numel()
        bits = packed.bits.unsqueeze(1).bitwise_and(_BIT_WEIGHTS.to(packed.bits.device)).ne(0).reshape(-1)[:numel]
        zero = torch.zeros((), dtype=packed.value.dtype, device=packed.value.device)
        return torch.where(bits, packed.value, zero).reshape(packed.shape)


@hookimpl
def register_compressors(register) -> None:
    register("bitmask", Bitmask)
