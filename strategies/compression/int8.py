"""Scaled int8 quantization: one float32 scale per row (or per group), 1 byte per element.

The scale adapts to each row's largest magnitude, so large activations never saturate (unlike
SlimFit's fixed-point clamps). Measured on a small BERT: storing every saved tensor this way
kept weight gradients at cosine 0.9999 to exact.

With ``log_domain: true`` the tensor holds log-probabilities (a log-softmax output, which a
cross-entropy loss saves: batch x length x vocabulary floats). They are stored as they are, in 8
unsigned bits spread evenly between the row's smallest and largest log-probability (a scale and
an offset per row), so every probability comes back with the same small *relative* error (at
most ``exp(range / 510) - 1``; the range of a real 49k-token LM's row is ~36, so 7%, unbiased
rounding) and the probabilities of a row still sum to ~1. Storing the probabilities themselves
with one absmax scale (this mode's first form) rounded every probability under 1/510 of the row's
largest to zero: on SmolLM2 that dropped ~6% of each row's mass, all from the same tail tokens,
a biased error that pushed every hidden state's gradient the same way and made the pretrained
decoder's training loss rise (``tests/test_log_probs_compression.py``).

YAML: ``compressor: {name: int8}``, ``{name: int8, group_size: 128}`` or
``{name: int8, log_domain: true}``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch

from slimfit_accel.compression import native
from slimfit_accel.compression.packing import absmax_scale, as_groups, from_groups, native_rows
from slimfit_accel.hookspecs import SavedTensorContext, hookimpl


class Int8Packed(NamedTuple):
    codes: torch.Tensor  # int8, one per element (+ group padding)
    scale: torch.Tensor  # float32, one per group
    shape: torch.Size
    dtype: torch.dtype


@dataclass
class Int8Scaled:
    """Symmetric int8 with a stored absmax scale; ``group_size=None`` means one scale per row.

    Example::

        c = Int8Scaled(group_size=64)
        x = torch.randn(4, 100)
        assert c.unpack(c.pack(x, ctx)).shape == x.shape
    """

    group_size: int | None = None
    log_domain: bool = False

    def __post_init__(self) -> None:
        if self.group_size is not None and self.group_size < 1:
            raise ValueError(f"int8: group_size must be a positive integer or null, got {self.group_size}")

    def pack(self, tensor: torch.Tensor, ctx: SavedTensorContext | None = None) -> Int8Packed:
        rows = native_rows(tensor, self.group_size)
        if rows is not None:  # the fused CPU kernel: the same codes and scales in one pass
            packed = native.log_pack(rows) if self.log_domain else native.int8_pack(rows)
            if packed is not None:
                return Int8Packed(packed[0], packed[1], tensor.shape, tensor.dtype)
        if self.log_domain:
            groups = as_groups(tensor, self.group_size).float()
            low, high = groups.amin(-1, keepdim=True), groups.amax(-1, keepdim=True)
            # a row of equal values (or -inf entries) still packs: a positive, finite step
            low = torch.maximum(low, high - 200.0)
            step = ((high - low) / 255).clamp_min(torch.finfo(torch.float32).tiny)
            codes = (groups - low).clamp_min_(0).div_(step).round_().clamp_(0, 255).to(torch.uint8)
            return Int8Packed(codes, torch.cat([step, low], dim=-1), tensor.shape, tensor.dtype)
        groups = as_groups(tensor, self.group_size)
        scale = absmax_scale(groups, 127)
        # |x| / scale <= 127 by construction, so rounding cannot leave the int8 range.
        codes = torch.mul(groups, scale.reciprocal()).round_().to(torch.int8)
        return Int8Packed(codes, scale, tensor.shape, tensor.dtype)

    def unpack(self, packed: Int8Packed) -> torch.Tensor:
        if packed.codes.dim() == 2 and native.covers_unpacked(packed.codes, packed.dtype):
            unpack = native.log_unpack if packed.codes.dtype == torch.uint8 else native.int8_unpack
            return from_groups(unpack(packed.codes, packed.scale, packed.dtype), packed.shape, packed.dtype)
        if packed.codes.dtype == torch.uint8:  # log domain: step and offset per row
            step, low = packed.scale.split(1, dim=-1)
            values = packed.codes.to(torch.float32).mul_(step).add_(low)
            return from_groups(values, packed.shape, packed.dtype)
        # Widen then scale in place: the same float32 products as a mixed int8 x float32
        # multiply, about twice as fast on CPU.
        values = packed.codes.to(torch.float32).mul_(packed.scale)
        return from_groups(values, packed.shape, packed.dtype)


@hookimpl
def register_compressors(register) -> None:
    register("int8", Int8Scaled)
