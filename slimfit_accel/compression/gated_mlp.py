"""Gated MLP that saves its two projections' outputs only: ``down(act(gate(x)) * up(x))``.

Llama-, Mistral-, Qwen- and Gemma-style feed-forward blocks compute ``act(g) * u``. Autograd
then keeps three tensors of the wide width: ``g`` (for the activation's backward), ``act(g)``
(for ``u``'s gradient) and ``u`` (for ``act(g)``'s gradient). The engine swaps in an exact
autograd function that keeps only ``g`` and ``u`` and recomputes ``act(g)`` (elementwise,
cheap) in backward: a third less to store. The saved tensors carry roles for the policy:
``gated_gate`` (``g``: both gradients read ``act(g)`` or ``act'(g)`` from it; int8 by default)
and ``gated_up`` (``u``: only the gate's gradient reads it; int4 by default, so that gradient
has one 4-bit factor, as it had when the activation module kept ``g`` in 4 bits).

A module is swapped because of what it computes, not its class name: its children are exactly
three projections (two-dimensional weights) and one parameterless activation, and on a probe
input its own forward equals ``down(act(gate(x)) * up(x))`` for one assignment of the
projections. The probe runs on a same-class copy with random weights (``probe.py``), so it also
decides on ZeRO-3 partitions and meta weights. Anything else (dropout inside, a fused gate-up
projection) keeps its own forward.
"""

from __future__ import annotations

from itertools import permutations
from typing import Callable

import torch
from torch import nn

from .kinds import _activation_kind, _is_projection
from .probe import full_shape, probe_copy, probe_input
from .roles import tag_role
from .swaps import swap_forwards


class GatedProduct(torch.autograd.Function):
    """``act(gate) * up`` whose backward reads ``gate`` and ``up`` and recomputes ``act(gate)``."""

    @staticmethod
    def forward(ctx, gate, up, act):  # type: ignore[override]
        activated = act(gate)
        ctx.act = act
        if ctx.needs_input_grad[0] or ctx.needs_input_grad[1]:
            tag_role(gate, "gated_gate")  # read by both gradients (act(g) and act'(g))
            tag_role(up, "gated_up")  # read by the gate's gradient only
            ctx.save_for_backward(gate, up)
        return activated * up

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        gate, up = ctx.saved_tensors
        # The recomputation is a private graph: its own saved tensors are kept as they are.
        with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t):
            gate = gate.detach().requires_grad_(ctx.needs_input_grad[0])
            activated = ctx.act(gate)
        grad_gate = grad_up = None
        if ctx.needs_input_grad[1]:
            grad_up = grad_out * activated.detach()
        if ctx.needs_input_grad[0]:
            (grad_gate,) = torch.autograd.grad(activated, gate, grad_out * up)
        return grad_gate, grad_up, None


def _assignment(module: nn.Module) -> tuple[str, str, str, str] | None:
    """(gate, up, down, act) child names for which ``module`` computes a gated MLP, or None."""
    children = dict(module.named_children())
    acts = [name for name, child in children.items() if _activation_kind(child)]
    projections = [name for name, child in children.items() if _is_projection(child)]
    if len(children) != 4 or len(acts) != 1 or len(projections) != 3 or any(True for _ in module.parameters(recurse=False)):
        return None
    shapes = {name: full_shape(children[name].weight) for name in projections}
    candidates = [
        (gate, up, down) for gate, up, down in permutations(projections)
        if shapes[gate] == shapes[up] and shapes[down] == shapes[gate][::-1]
    ]
    if not candidates:
        return None
    try:
        with torch.no_grad():
            probe = probe_copy(module)
            twins = probe._modules
            x = probe_input(3, twins[candidates[0][0]].weight)  # the gate's input width
            got = type(module).forward(probe, x)
            for gate, up, down in candidates:
                want = twins[down](twins[acts[0]](twins[gate](x)) * twins[up](x))
                if isinstance(got, torch.Tensor) and got.shape == want.shape and torch.allclose(got.float(), want.float(), rtol=1e-4, atol=1e-5):
                    return gate, up, down, acts[0]
    except Exception:  # a forward that needs other arguments is not a plain gated MLP
        return None
    return None


def _forward(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    gate, up, down, act = module._slimfit_swap
    children = module._modules
    return children[down](GatedProduct.apply(children[gate](x), children[up](x), children[act].forward))


def swap_gated_mlps(model: nn.Module) -> tuple[list[nn.Module], Callable[[], None]]:
    """Route every gated MLP in ``model`` (see the module docstring) through
    :class:`GatedProduct`. Returns the swapped modules and a function that undoes the swap."""
    return swap_forwards(model, _forward, _assignment)
