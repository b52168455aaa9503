"""``bitmask``: a tensor whose entries are all 0 or one value c (a dropout mask), one bit each.

Dropout saves its mask for backward: bool on CUDA, but on CPU a float tensor of 0 and
1 / (1 - p), 4 bytes an element. Stored as bits plus c it takes 1/32 of that, exactly. A tensor
that is not such a mask goes to the ``fallback`` (kept as it is by default), so the rule can
never corrupt a gradient. With ``fallback: int8`` it suits modules that save masks among other
tensors (attention applies dropout to its probabilities inside the module).

With ``sign: true`` any tensor is stored as the bits of ``x > 0`` and comes back as 1 where
positive, 0 elsewhere: exact for ReLU and LeakyReLU, whose backward reads only that sign.

YAML: ``compressor: {name: bitmask}``, ``{name: bitmask, fallback: int8}`` or
``{name: bitmask, sign: true}``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, NamedTuple

import torch

from slimfit_accel.hookspecs import SavedTensorContext, hookimpl
from slimfit_accel.strategies.compression.int8 import Int8Scaled

_BIT_WEIGHTS = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8)
_PROBE = 4096  # elements looked at before the full check


def _leading(tensor: torch.Tensor, count: int) -> torch.Tensor:
    """``tensor.reshape(-1)[:count]`` without copying more of a strided tensor than it needs:
    index 0 of the leading dimensions is taken while what remains still holds ``count``
    elements (the flattened tensor's prefix in logical order), and only that part is reshaped."""
    while tensor.dim() > 1 and tensor.shape[0] and tensor[0].numel() >= count:
        tensor = tensor[0]
    return tensor.reshape(-1)[:count]


def _first_row_rejects(tensor: torch.Tensor) -> bool:
    """Whether the first row (a view, nothing copied) holds two different non-zero values, so
    ``tensor`` is no 0/c mask: its minimum and maximum in one reduction (about five times cheaper
    than the probe's five ops on attention operands and statistics, which it settles). A minimum
    below zero and a maximum above it are two such values, and so are two different bounds of
    one sign without zeros. NaN (every comparison false) or zeros beside values of one sign (a
    dropout mask's row) say nothing: the probe and the full check decide, as before, so the
    result is the same either way."""
    row = tensor[(0,) * (tensor.dim() - 1)] if tensor.dim() > 1 else tensor
    low, high = (bound.item() for bound in torch.aminmax(row))
    return low < 0 < high or ((low > 0 or high < 0) and low != high)


class BitmaskPacked(NamedTuple):
    bits: torch.Tensor  # uint8, 8 entries a byte (zero-padded at the end)
    value: torch.Tensor  # the one non-zero value c, in the original dtype
    shape: torch.Size


@dataclass
class Bitmask:
    """Exact one-bit storage of 0/c masks; anything else goes to ``fallback`` (none or int8).

    ``sign``: store the sign pattern ``x > 0`` of any tensor instead (for ReLU backward).
    """

    fallback: Literal["none", "int8"] = "none"
    sign: bool = False
    _fallback: Int8Scaled | None = field(init=False, repr=False, default=None)

    def __post_init__(self) -> None:
        self._fallback = Int8Scaled() if self.fallback == "int8" else None

    def pack(self, tensor: torch.Tensor, ctx: SavedTensorContext | None = None) -> Any:
        if self.sign and tensor.is_floating_point():
            one = torch.ones((), dtype=tensor.dtype, device=tensor.device)
            # compare, then flatten: a strided tensor is copied as bools, not as floats
            return self._pack_bits((tensor.detach() > 0).reshape(-1), one, tensor)
        packed = self._pack_mask(tensor)
        if packed is not None:
            return packed
        return self._fallback.pack(tensor, ctx) if self._fallback is not None else tensor

    def _pack_mask(self, tensor: torch.Tensor) -> BitmaskPacked | None:
        if tensor.numel() == 0 or not (tensor.is_floating_point() or tensor.dtype == torch.bool):
            return None
        if tensor.dtype == torch.bool:
            flat = tensor.detach().reshape(-1)
            nonzero, value = flat, torch.ones((), dtype=torch.bool, device=flat.device)
        else:
            # Cheap rejection first: most tensors offered here are not masks. The first row
            # usually tells in one reduction; else a few thousand elements (two distinct non-zero
            # values there settle it). The probe copies only those elements of a strided tensor
            # (attention's transposed operands), not the whole tensor.
            if _first_row_rejects(tensor.detach()):
                return None
            head = _leading(tensor.detach(), _PROBE)
            head_nonzero = head[head != 0]
            if head_nonzero.numel() and not bool((head_nonzero == head_nonzero[0]).all()):
                return None
            flat = tensor.detach().reshape(-1)
            nonzero = flat != 0
            if not bool(nonzero.any()):
                value = torch.zeros((), dtype=flat.dtype, device=flat.device)
            else:
                value = head_nonzero[0] if head_nonzero.numel() else flat[nonzero.byte().argmax()]
                if not torch.equal(flat == value, nonzero):  # some non-zero differs from c
                    return None
        return self._pack_bits(nonzero, value, tensor)

    @staticmethod
    def _pack_bits(nonzero: torch.Tensor, value: torch.Tensor, tensor: torch.Tensor) -> BitmaskPacked:
        codes = nonzero.view(torch.uint8)
        pad = (-codes.numel()) % 8
        if pad:
            codes = torch.nn.functional.pad(codes, (0, pad))
        columns = codes.reshape(-1, 8)
        packed = columns[:, 0].clone()
        for bit in range(1, 8):
            packed.bitwise_or_(columns[:, bit] << bit)
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
