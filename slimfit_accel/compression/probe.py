"""A same-class copy of a module with random weights, to ask what its forward computes.

The swaps (``rmsnorm.py``, ``gated_mlp.py``) replace a module's forward only where its own
forward, run on a probe input, gives what the swap computes. Probing the module itself would
need its weights, which are often not there when the engine attaches: under DeepSpeed ZeRO-3
they are empty partitions after ``accelerator.prepare`` (and from the start under
``zero.Init``), on the meta device before loading. Its weights would also test one value only:
a scale of ones cannot tell ``w * x`` from ``x``. So the probe runs on a copy: the same class
and attributes, fresh random parameters of the full shape (ties kept), cloned buffers, children
copied alike, and no hooks, so it never touches the module's weights nor DeepSpeed's or the
engine's hooks, and needs no collective.
"""

from __future__ import annotations

import copy

import torch
from torch import nn


def full_shape(param: torch.Tensor) -> tuple[int, ...]:
    """The parameter's real shape, also when DeepSpeed ZeRO-3 has partitioned it away."""
    return tuple(getattr(param, "ds_shape", param.shape))


def probe_input(rows: int, like: torch.Tensor) -> torch.Tensor:
    """A seeded random input of ``rows`` rows over ``like``'s last dimension, on its device and dtype."""
    x = torch.randn(rows, like.shape[-1], generator=torch.Generator().manual_seed(1))
    return x.to(like.device, like.dtype)


def probe_device(module: nn.Module) -> torch.device:
    """Where the probe copy and its input live: the module's parameters' device (CPU for meta)."""
    for param in module.parameters():
        return torch.device("cpu") if param.is_meta else param.device
    return torch.device("cpu")


def probe_copy(module: nn.Module, seed: int = 0) -> nn.Module:
    """A copy of ``module`` whose parameters are random (standard normal, seeded) with their
    full shapes and dtypes, placed on :func:`probe_device` (drawn there: a large MLP's copy on
    a GPU takes no time)."""
    device = probe_device(module)
    generator = torch.Generator(device=device).manual_seed(seed)
    made: dict[int, object] = {}

    def fresh_param(param: nn.Parameter | None) -> nn.Parameter | None:
        if param is None:
            return None
        if id(param) not in made:
            values = torch.randn(full_shape(param), generator=generator, device=device).to(param.dtype)
            made[id(param)] = nn.Parameter(values, requires_grad=False)
        return made[id(param)]

    def fresh_buffer(buffer: torch.Tensor | None) -> torch.Tensor | None:
        if buffer is None:
            return None
        if buffer.is_meta:
            raise ValueError("a buffer on the meta device has no values to probe with")
        return buffer.detach().clone().to(device)

    def clone(original: nn.Module) -> nn.Module:
        if id(original) in made:
            return made[id(original)]  # type: ignore[return-value]
        twin = copy.copy(original)  # shallow: the dicts below are replaced, never mutated
        made[id(original)] = twin
        for name, value in vars(original).items():
            if "_hooks" in name and isinstance(value, dict):
                setattr(twin, name, type(value)())
        twin.__dict__.pop("forward", None)  # a forward patched on the instance is bound to the original
        twin._parameters = {name: fresh_param(p) for name, p in original._parameters.items()}
        twin._buffers = {name: fresh_buffer(b) for name, b in original._buffers.items()}
        twin._modules = {name: clone(child) if child is not None else None for name, child in original._modules.items()}
        return twin

    return clone(module)
