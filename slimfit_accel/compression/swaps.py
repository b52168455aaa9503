"""Instance-level forward swaps: route chosen modules through an exact autograd function.

The LayerNorm, RMSNorm and gated-MLP swaps (``layernorm.py``, ``rmsnorm.py``, ``gated_mlp.py``)
differ only in which modules they pick and what they compute; this is the shared part: patch
``forward`` on the instance (the class is untouched, so other models are not affected), keep
what the pick found on the module, and undo both. What is patched lives on the module only, so a
``copy.deepcopy`` of the model runs its own weights and ``torch.save(model)`` works.
"""

from __future__ import annotations

from functools import partial
from typing import Any, Callable

from torch import nn


def bind_forward(module: nn.Module, forward: Callable[..., Any]) -> Callable[..., Any]:
    """``forward`` bound to ``module``, for ``module.forward = ...``, as a ``functools.partial``
    of a module-level function: a deep copy of the model rebinds it to the copy, and pickling
    (``torch.save(model)``) stores the function by name. (A bound method would pickle as
    ``getattr(module, forward.__name__)``, which fails; a closure cannot be pickled at all.)"""
    return partial(forward, module)


def swap_forwards(
    model: nn.Module, forward: Callable[..., Any], pick: Callable[[nn.Module], Any]
) -> tuple[list[nn.Module], Callable[[], None]]:
    """Bind ``forward`` on every module of ``model`` for which ``pick(module)`` is not None, and
    keep that value as ``module._slimfit_swap`` for ``forward`` to read. Modules whose
    ``forward`` is already patched on the instance (by another swap, or e.g. Accelerate's
    offload hooks) are left alone. Returns the swapped modules and a function that undoes it."""
    swapped = []
    for module in model.modules():
        if "forward" in module.__dict__:
            continue
        found = pick(module)
        if found is not None:
            module._slimfit_swap = found
            module.forward = bind_forward(module, forward)
            swapped.append(module)

    def restore() -> None:
        for module in swapped:
            module.__dict__.pop("forward", None)
            module.__dict__.pop("_slimfit_swap", None)

    return swapped, restore
