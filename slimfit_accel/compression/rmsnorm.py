"""RMSNorm that saves what can be compressed: the normalized output and the per-row 1/rms.

Llama-, Mistral-, Qwen- and T5-style RMSNorms are written in Python: ``x * rsqrt(mean(x^2) +
eps)`` then ``weight * x_hat``, so autograd keeps the input ``x`` (and ``x_hat`` when the scale
trains). Like ``layernorm.py`` for LayerNorm, the engine swaps in an exact autograd function that
keeps only ``x_hat`` (role ``normalized``) and 1/rms (role ``rstd``): the input gradient is
``rstd * (g*w - x_hat * mean(g*w*x_hat))`` and the scale's gradient ``sum(g * x_hat)``. With
the scale frozen, ``x_hat`` (values of order 1 in every row) quantizes well.

A module is swapped because of what it computes, never its class name: it has one 1-D ``weight``
over the last dimension, an epsilon attribute, and on a probe input its own forward, run on a
same-class copy with a random weight (``probe.py``: also when its own weight is a ZeRO-3
partition or on the meta device), gives ``weight * x * rsqrt(mean(x^2) + eps)``. Gemma's
``(1 + weight) * x_hat`` is not one, nor a norm that holds a weight of ones and ignores it.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from .probe import full_shape, probe_copy, probe_input
from .roles import tag_role
from .swaps import swap_forwards

_EPS_NAMES = ("variance_epsilon", "eps", "epsilon")


class NormalizedRMSNorm(torch.autograd.Function):
    """``weight * (x * rsqrt(mean(x^2) + eps))`` whose backward reads x_hat and 1/rms."""

    @staticmethod
    def forward(ctx, x, weight, eps):  # type: ignore[override]
        x32 = x.float()
        rstd = torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
        x_hat = (x32 * rstd).to(x.dtype)
        out = weight * x_hat
        x_needs, w_needs = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if x_needs or w_needs:
            tag_role(x_hat, "normalized")
            tag_role(rstd, "rstd")
        ctx.save_for_backward(x_hat if (x_needs or w_needs) else None, rstd if x_needs else None, weight if x_needs else None)
        return out

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        x_hat, rstd, weight = ctx.saved_tensors
        g = grad_out.float()
        grad_x = grad_w = None
        if ctx.needs_input_grad[0]:
            gw = g * weight.float()
            x_hat_f = x_hat.float()
            grad_x = (rstd * (gw - x_hat_f * (gw * x_hat_f).mean(-1, keepdim=True))).to(grad_out.dtype)
        if ctx.needs_input_grad[1]:
            lead = tuple(range(g.dim() - 1))
            grad_w = (g * x_hat.float()).sum(lead)  # autograd casts it to the weight's dtype
        return grad_x, grad_w, None


def _eps(module: nn.Module) -> float | None:
    for name in _EPS_NAMES:
        value = getattr(module, name, None)
        if isinstance(value, float):
            return value
    return None


def _forward(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return NormalizedRMSNorm.apply(x, module.weight, module._slimfit_swap)


def is_rmsnorm(module: nn.Module) -> bool:
    """Whether ``module`` computes ``weight * x * rsqrt(mean(x^2) + eps)`` over the last dim."""
    weight = getattr(module, "weight", None)
    eps = _eps(module)
    if not isinstance(weight, nn.Parameter) or len(full_shape(weight)) != 1 or eps is None or isinstance(module, nn.LayerNorm):
        return False
    if [n for n, _ in module.named_parameters()] != ["weight"] or any(True for _ in module.children()):
        return False
    try:
        with torch.no_grad():
            probe = probe_copy(module)
            weight = probe.weight
            x = probe_input(3, weight)
            got = type(module).forward(probe, x)
            x32 = x.float()
            want = weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)
        return isinstance(got, torch.Tensor) and got.shape == want.shape and torch.allclose(got.float(), want.float(), rtol=1e-4, atol=1e-5)
    except Exception:  # a forward that needs other arguments is not a plain RMSNorm
        return False


def swap_rmsnorms(model: nn.Module) -> tuple[list[nn.Module], Callable[[], None]]:
    """Route every RMSNorm in ``model`` (see :func:`is_rmsnorm`) through :class:`NormalizedRMSNorm`.

    Returns the swapped modules and a function that undoes the swap.
    """
    return swap_forwards(model, _forward, lambda module: _eps(module) if is_rmsnorm(module) else None)
