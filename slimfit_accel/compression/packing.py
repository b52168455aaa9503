"""Bit-level building blocks shared by the built-in compressors: grouping, scaling, nibbles.

Pure torch ops on any device. Every function returns compact (contiguous, owning) tensors, so
the engine's byte count of a packed activation is exactly what it keeps alive.
"""

from __future__ import annotations

import torch


def as_groups(tensor: torch.Tensor, group_size: int | None) -> torch.Tensor:
    """View ``tensor`` as a 2-D float32 matrix with one quantization group per row.

    ``group_size=None`` makes each row of the last dimension a group (one scale per token);
    otherwise the flattened tensor is cut into runs of ``group_size`` elements, zero-padded at the
    end, so any size works. Undo with :func:`from_groups`.
    """
    flat = tensor.detach().reshape(-1)
    if group_size is None:
        width = tensor.shape[-1] if tensor.dim() > 0 and tensor.shape[-1] > 0 else 1
        return flat.float().reshape(-1, width)
    pad = (-flat.numel()) % group_size
    if pad:  # zero padding is exact in any dtype: pad before widening, one float32 copy only
        flat = torch.nn.functional.pad(flat, (0, pad))
    return flat.float().reshape(-1, group_size)


def native_rows(tensor: torch.Tensor, group_size: int | None) -> torch.Tensor | None:
    """``tensor`` shaped so its last dimension holds the groups :func:`as_groups` would make, in
    its own dtype and without a copy where it can be, when the fused CPU kernels
    (:mod:`.native`) can pack it (CPU float32/bfloat16, no padding needed); else None."""
    from . import native

    if not native.covers(tensor) or tensor.numel() == 0:
        return None
    tensor = tensor.detach()
    if group_size is None:
        return tensor.reshape(1, 1) if tensor.dim() == 0 else tensor
    if tensor.numel() % group_size:
        return None
    return tensor.reshape(-1, group_size)


def from_groups(groups: torch.Tensor, shape: torch.Size, dtype: torch.dtype) -> torch.Tensor:
    """Inverse of :func:`as_groups`: drop the padding, restore ``shape`` and ``dtype``."""
    numel = 1
    for size in shape:
        numel *= size
    return groups.reshape(-1)[:numel].reshape(shape).to(dtype)


def absmax_scale(groups: torch.Tensor, qmax: int) -> torch.Tensor:
    """One float32 scale per group so that the largest magnitude maps to ``qmax``.

    All-zero groups get scale 1 (any value decodes them), so division never makes NaN. The
    magnitude is ``max(amax, -amin)``: the same value as ``abs().amax()`` (NaN propagates; only
    an all-zero group may differ, by the sign of its zero, and it gets scale 1 either way) without
    a full-size ``abs()`` temporary, several times faster on CPU.
    """
    scale = torch.maximum(groups.amax(dim=1, keepdim=True), groups.amin(dim=1, keepdim=True).neg_())
    scale.div_(qmax)
    return scale.masked_fill_(~(scale > 0), 1.0)


def pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """Pack unsigned 4-bit codes (uint8 in [0, 15]) two per byte; an odd count is padded."""
    flat = codes.reshape(-1).to(torch.uint8)
    if flat.numel() % 2:
        flat = torch.cat([flat, flat.new_zeros(1)])
    pairs = flat.reshape(-1, 2)
    return (pairs[:, 1] << 4).bitwise_or_(pairs[:, 0])  # fresh and contiguous


def unpack_nibbles(packed: torch.Tensor, numel: int) -> torch.Tensor:
    """Inverse of :func:`pack_nibbles`: the first ``numel`` 4-bit codes, as uint8."""
    codes = torch.empty(packed.numel(), 2, dtype=torch.uint8, device=packed.device)
    torch.bitwise_and(packed, 0x0F, out=codes[:, 0])
    torch.bitwise_right_shift(packed, 4, out=codes[:, 1])
    return codes.reshape(-1)[:numel]
