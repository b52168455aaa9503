"""SlimFit's fixed-point formats: a constant step and clamp range, no stored scale.

As in the reference: GELU inputs as 4 bit (step 0.5, range [-4, 3.5], two per byte), attention
Q, K and V as int8 (step 1/16, range +-8), attention probabilities as uint8 (step 1/256). These
are tuned for BERT/ViT at fine-tuning time; values outside the range saturate, which is why the
default policy uses the scaled formats (``int8``/``int4``) and these serve parity checks.

YAML: ``compressor: {name: fixed_point, bits: 4, step: 0.5}`` or ``{name: slimfit_attention}``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch

from slimfit_accel.compression.packing import pack_nibbles, unpack_nibbles
from slimfit_accel.hookspecs import SavedTensorContext, hookimpl


class FixedPacked(NamedTuple):
    codes: torch.Tensor  # uint8 (nibbles or bytes) or int8
    shape: torch.Size
    dtype: torch.dtype


@dataclass
class FixedPoint:
    """Codes ``round(x / step)`` clamped to ``bits`` bits, signed or unsigned.

    Example (the reference's GELU-input format)::

        c = FixedPoint(bits=4, step=0.5)      # range [-4, 3.5], two codes per byte
        y = c.unpack(c.pack(torch.randn(8, 16), ctx))
    """

    bits: int = 8
    step: float = 1 / 16
    signed: bool = True

    def __post_init__(self) -> None:
        if self.bits not in (4, 8):
            raise ValueError(f"fixed_point: bits must be 4 or 8, got {self.bits}")
        if not self.step > 0:
            raise ValueError(f"fixed_point: step must be positive, got {self.step}")

    @property
    def _range(self) -> tuple[int, int]:
        levels = 1 << self.bits
        return (-(levels // 2), levels // 2 - 1) if self.signed else (0, levels - 1)

    def pack(self, tensor: torch.Tensor, ctx: SavedTensorContext | None = None) -> FixedPacked:
        low, high = self._range
        codes = torch.round(tensor.detach().float() / self.step).clamp_(low, high)
        if self.bits == 4:
            return FixedPacked(pack_nibbles((codes - low).to(torch.uint8)), tensor.shape, tensor.dtype)
        return FixedPacked(codes.to(torch.int8 if self.signed else torch.uint8), tensor.shape, tensor.dtype)

    def unpack(self, packed: FixedPacked) -> torch.Tensor:
        low, _ = self._range
        if self.bits == 4:
            codes = unpack_nibbles(packed.codes, packed.shape.numel()).float() + low
        else:
            codes = packed.codes.float()
        return (codes * self.step).reshape(packed.shape).to(packed.dtype)


_PROBABILITY = FixedPoint(bits=8, step=1 / 256, signed=False)
_OPERAND = FixedPoint(bits=8, step=1 / 16, signed=True)


@dataclass
class SlimFitAttentionFixed:
    """The reference's attention formats in one compressor: probabilities (non-negative
    tensors) as uint8 with step 1/256, every other operand (Q, K, V) as int8 with step 1/16.

    Telling probabilities apart costs a min-reduction (a device sync on GPU); this format is
    for parity with the reference, not for speed.
    """

    def pack(self, tensor: torch.Tensor, ctx: SavedTensorContext | None = None):
        is_probability = bool(tensor.min() >= 0) if tensor.numel() else False
        fmt = _PROBABILITY if is_probability else _OPERAND
        return is_probability, fmt.pack(tensor, ctx)

    def unpack(self, packed) -> torch.Tensor:
        is_probability, inner = packed
        return (_PROBABILITY if is_probability else _OPERAND).unpack(inner)


@hookimpl
def register_compressors(register) -> None:
    register("fixed_point", FixedPoint)
    register("slimfit_attention", SlimFitAttentionFixed)
