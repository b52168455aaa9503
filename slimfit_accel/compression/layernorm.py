"""LayerNorm that saves what SlimFit prunes: the normalized output and the per-row 1/std.

PyTorch's native LayerNorm saves its *input* (plus mean and 1/std). SlimFit instead keeps the
normalized output x_hat = (x - mean) / std, pruned to its largest 10% when the LayerNorm is
frozen: the input gradient needs only x_hat, 1/std and the scale. Pruning the input itself
would be a different (and worse) approximation, so while the compression engine is active it
swaps this exact autograd function into every stock ``nn.LayerNorm``. The forward result is the
same as native; the saved x_hat is tagged with role ``normalized`` and 1/std with ``rstd``.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from .roles import tag_role
from .swaps import swap_forwards


class NormalizedLayerNorm(torch.autograd.Function):
    """``layer_norm`` whose backward reads x_hat and 1/std instead of the input."""

    @staticmethod
    def forward(ctx, x, weight, bias, normalized_shape, eps):  # type: ignore[override]
        out, mean, rstd = torch.native_layer_norm(x, normalized_shape, weight, bias, eps)
        ctx.dims = tuple(range(x.dim() - len(normalized_shape), x.dim()))
        x_needs, w_needs = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        x_hat = None
        if x_needs or w_needs:  # only the bias needs nothing saved
            x_hat = ((x.float() - mean) * rstd).to(x.dtype)
            tag_role(x_hat, "normalized")
            tag_role(rstd, "rstd")
        ctx.save_for_backward(x_hat, rstd if x_needs else None, weight if x_needs else None)
        return out

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        x_hat, rstd, weight = ctx.saved_tensors
        dims = ctx.dims
        g = grad_out.float()
        x_hat_f = x_hat.float() if x_hat is not None else None
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            gx = g * weight.float() if weight is not None else g
            gx_mean = gx.mean(dims, keepdim=True)
            proj = (gx * x_hat_f).mean(dims, keepdim=True)
            grad_x = (rstd * (gx - gx_mean - x_hat_f * proj)).to(grad_out.dtype)
        lead = tuple(range(g.dim() - len(dims)))
        if ctx.needs_input_grad[1]:
            grad_w = (g * x_hat_f).sum(lead).to(grad_out.dtype)
        if ctx.needs_input_grad[2]:
            grad_b = g.sum(lead).to(grad_out.dtype)
        return grad_x, grad_w, grad_b, None, None


def _forward(module: nn.LayerNorm, x: torch.Tensor) -> torch.Tensor:
    # Autocast runs layer_norm in float32; a custom Function is not on autocast's list, so do it.
    if torch.is_autocast_enabled(x.device.type):
        x = x.float()
    weight, bias = module.weight, module.bias
    if weight is not None and weight.dtype != x.dtype:
        weight = weight.to(x.dtype)
    if bias is not None and bias.dtype != x.dtype:
        bias = bias.to(x.dtype)
    return NormalizedLayerNorm.apply(x, weight, bias, tuple(module.normalized_shape), module.eps)


def swap_layernorms(model: nn.Module) -> Callable[[], None]:
    """Route every stock ``nn.LayerNorm`` in ``model`` through :class:`NormalizedLayerNorm`.

    Subclasses that override ``forward`` and modules whose ``forward`` is already patched (e.g.
    by Accelerate's offload hooks) are left alone. Returns a function that undoes the swap.
    """
    _, restore = swap_forwards(model, _forward, lambda module: True if type(module).forward is nn.LayerNorm.forward else None)
    return restore
