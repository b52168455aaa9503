"""``bitmask``: a tensor whose entries are all 0 or one value c (a dropout mask), one bit each.

Dropout saves its mask for backward: bool on CUDA, but on CPU a float tensor of 0 and
1 / (1 - p), 4 bytes an element. Stored as bits plus c it takes 1/32 of that, exactly. A tensor
that is not such a mask goes to the ``fallback`` (kept as it is by default), so the rule can
never corrupt a gradient. With ``fallback: int8`` it suits modules that save masks among other
tensors (attention applies dropout to its probabilities inside the module).

YAML: ``compressor: {name: bitmask}`` or ``{name: bitmask, fallback: int8}``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, NamedTuple

import torch

from slimfit_accel.hookspecs import SavedTensorContext, hookimpl
from slimfit_accel.strategies.compression.int8 import Int8Scaled

_BIT_WEIGHTS = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8)


class BitmaskPacked(NamedTuple):
    bits: torch.Tensor  # uint8, 8 entries a byte (zero-padded at the end)
    value: torch.Tensor  # the one non-zero value c, in the original dtype
    shape: torch.Size


@dataclass
class Bitmask:
    """Exact one-bit storage of 0/c masks; anything else goes to ``fallback`` (none or int8)."""

    fallback: Literal["none", "int8"] = "none"
    _fallback: Int8Scaled | None = field(init=False, repr=False, default=None)

    def __post_init__(self) -> None:
        self._fallback = Int8Scaled() if self.fallback == "int8" else None

    def pack(self, tensor: torch.Tensor, ctx: SavedTensorContext | None = None) -> Any:
        packed = self._pack_mask(tensor)
        if packed is not None:
            return packed
        return self._fallback.pack(tensor, ctx) if self._fallback is not None else tensor

    def _pack_mask(self, tensor: torch.Tensor) -> BitmaskPacked | None:
        flat = tensor.detach().reshape(-1)
        if flat.numel() == 0 or not (tensor.is_floating_point() or tensor.dtype == torch.bool):
            return None
        nonzero = flat != 0
        value = flat.abs().amax() if flat.dtype != torch.bool else torch.ones((), dtype=torch.bool, device=flat.device)
        value = torch.where(nonzero.any(), flat[nonzero.to(torch.int8).argmax()], value)
        if not bool((flat == value).logical_or_(~nonzero).all()):  # not a 0/c mask
            return None
        pad = (-flat.numel()) % 8
        bits = torch.nn.functional.pad(nonzero.to(torch.uint8), (0, pad)).reshape(-1, 8)
        packed = (bits * _BIT_WEIGHTS.to(bits.device)).sum(dim=1, dtype=torch.uint8)
        return BitmaskPacked(packed, value.to(tensor.dtype).clone(), tensor.shape)

    def unpack(self, packed: Any) -> torch.Tensor:
        if isinstance(packed, torch.Tensor):
            return packed
        if not isinstance(packed, BitmaskPacked):
            return self._fallback.unpack(packed)
        numel = packed.shape.numel()
        bits = packed.bits.unsqueeze(1).bitwise_and(_BIT_WEIGHTS.to(packed.bits.device)).ne(0).reshape(-1)[:numel]
        zero = torch.zeros((), dtype=packed.value.dtype, device=packed.value.device)
        return torch.where(bits, packed.value, zero).reshape(packed.shape)


@hookimpl
def register_compressors(register) -> None:
    register("bitmask", Bitmask)
