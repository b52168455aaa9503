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
    flat = tensor.detach().float().reshape(-1)
    if group_size is None:
        width = tensor.shape[-1] if tensor.dim() > 0 and tensor.shape[-1] > 0 else 1
        return flat.reshape(-1, width)
    pad = (-flat.numel()) % group_size
    if pad:
        flat = torch.nn.functional.pad(flat, (0, pad))
    return flat.reshape(-1, group_size)


def from_groups(groups: torch.Tensor, shape: torch.Size, dtype: torch.dtype) -> torch.Tensor:
    """Inverse of :func:`as_groups`: drop the padding, restore ``shape`` and ``dtype``."""
    numel = 1
    for size in shape:
        numel *= size
    return groups.reshape(-1)[:numel].reshape(shape).to(dtype)


def absmax_scale(groups: torch.Tensor, qmax: int) -> torch.Tensor:
    """One float32 scale per group so that the largest magnitude maps to ``qmax``.

    All-zero groups get scale 1 (any value decodes them), so division never makes NaN.
    """
    scale = groups.abs().amax(dim=1, keepdim=True).div_(qmax)
    return torch.where(scale > 0, scale, torch.ones_like(scale))


def pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """Pack unsigned 4-bit codes (uint8 in [0, 15]) two per byte; an odd count is padded."""
    flat = codes.reshape(-1).to(torch.uint8)
    if flat.numel() % 2:
        flat = torch.cat([flat, flat.new_zeros(1)])
    pairs = flat.reshape(-1, 2)
    return (pairs[:, 0] | (pairs[:, 1] << 4)).contiguous()


def unpack_nibbles(packed: torch.Tensor, numel: int) -> torch.Tensor:
    """Inverse of :func:`pack_nibbles`: the first ``numel`` 4-bit codes, as uint8."""
    low = packed & 0x0F
    high = packed >> 4
    return torch.stack([low, high], dim=1).reshape(-1)[:numel]
