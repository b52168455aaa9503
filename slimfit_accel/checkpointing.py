"""Frozen-aware activation checkpointing: chosen blocks keep only a compressed input.

A checkpointed transformer block saves nothing for backward during the forward pass; backward
recomputes it (``torch.utils.checkpoint``, non-reentrant, so DDP with unused parameters and
ZeRO work). What the block keeps instead is its input, and that input goes through the
compression engine like any saved tensor, tagged with role ``block_input`` (the default policy
stores it as int8, one scale per row; with ``compression: none`` it is kept exactly), or with
``exact_input`` tagged ``EXACT_ROLE`` and kept as it is. The recomputation starts from that
stored input: from an exact one it recomputes the forward's own values (same RNG state, same
autocast). What the recomputation saves is kept uncompressed while the block's backward runs, so
under compression a checkpointed block's gradients are more exact than without checkpointing
(equal to them with ``compression: none``).

SlimFit's frozen units need nothing special: they have ``requires_grad`` off during the step's
forward and backward, so neither the forward graph nor the recomputation computes their weight
gradients, and a frozen linear layer saves no input in the recomputation either.

The recomputed block's saved tensors are alive only during its backward; they are added to the
memory meter's live activation bytes (as ``recomputed``) while they are. Callables in
``before_recompute`` run just before each recomputation (the step in backward updates there the
units whose gradients are complete, so no finished gradient waits through the recomputation).

The patched forward is bound to each block and reads its state from the block, so a
``copy.deepcopy`` of the model checkpoints on its own weights and ``torch.save(model)`` works.

Example::

    checkpointing = BlockCheckpointing(model, blocks="all").attach()
    loss = model(**batch).loss
    loss.backward()
    checkpointing.detach()
"""

from __future__ import annotations

import weakref
from functools import partial
from typing import Any, Callable, Literal, Sequence

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from .compression.accounting import ByteCounter, tensor_bytes
from .compression.roles import EXACT_ROLE, tag_role
from .compression.swaps import bind_forward
from .errors import ConfigError
from .units import find_blocks

Blocks = Literal["all"] | int | Sequence[int]


class _KeepForRecompute(torch.autograd.Function):
    """Identity that saves its input: the block input then goes through the saved-tensor hooks
    (compressed, counted) and the recomputation reads it back from this node."""

    @staticmethod
    def forward(ctx, x):  # type: ignore[override]
        ctx.save_for_backward(x)
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        return grad


def select_blocks(paths: list[str], blocks: Blocks) -> list[str]:
    """The block paths ``blocks`` names: ``all``, the first N (nearest the input), or indices."""
    if blocks == "all":
        return list(paths)
    if isinstance(blocks, int):
        if blocks < 1:  # -1 meaning "the last block" would otherwise checkpoint nothing, silently
            raise ConfigError(f"checkpointing.blocks: {blocks} is a count of blocks from the input (at least 1); "
                              f"for blocks by index write a list, e.g. [{blocks}], or remove the checkpointing key")
        return list(paths[:blocks])
    wrong = [i for i in blocks if not -len(paths) <= i < len(paths)]
    if wrong:
        raise ConfigError(f"checkpointing.blocks: indices {wrong} out of range; the model has {len(paths)} blocks (0..{len(paths) - 1})")
    return [paths[i] for i in sorted({i % len(paths) for i in blocks})]


class BlockCheckpointing:
    """Checkpoints the chosen transformer blocks of ``model`` (found structurally, ``units.find_blocks``).

    ``counter``: the byte counter the recomputed tensors are added to while alive (the memory
    meter's engine counter); None counts nothing. ``exact_input``: keep each block's input as it
    is (else the policy compresses it, role ``block_input``).
    """

    def __init__(self, model: nn.Module, blocks: Blocks = "all", counter: ByteCounter | None = None, exact_input: bool = False):
        self.model = model
        self.input_role = EXACT_ROLE if exact_input else "block_input"
        paths = find_blocks(model)
        if not paths:
            raise ConfigError("checkpointing: no transformer blocks found in the model (a ModuleList of repeated layers); remove the checkpointing key")
        self.paths = select_blocks(paths, blocks)
        self.counter = counter
        self._wrapped: list[nn.Module] = []
        self.recomputations = 0
        self.before_recompute: list[Callable[[], None]] = []

    def attach(self) -> "BlockCheckpointing":
        if self._wrapped:
            return self
        for path in self.paths:
            module = self.model.get_submodule(path)
            if "forward" in module.__dict__:
                continue  # already patched on the instance by someone else
            module._slimfit_checkpointing = _Owner(self)
            module._slimfit_input_role = self.input_role
            module.forward = bind_forward(module, _checkpointed_forward)
            self._wrapped.append(module)
        return self

    def detach(self) -> None:
        for module in self._wrapped:
            module.__dict__.pop("forward", None)
            module.__dict__.pop("_slimfit_checkpointing", None)
            module.__dict__.pop("_slimfit_input_role", None)
        self._wrapped = []


class _Owner:
    """The ``BlockCheckpointing`` a patched block reports to (recomputations, recomputed bytes).

    A copy of the model (``copy.deepcopy``, ``torch.save``) keeps its blocks checkpointed, on its
    own weights, but reports to none: it is not the model that was attached.
    """

    __slots__ = ("checkpointing",)

    def __init__(self, checkpointing: BlockCheckpointing | None = None):
        self.checkpointing = checkpointing

    def __reduce__(self) -> tuple:
        return (_Owner, ())


def _checkpointed_forward(module: nn.Module, *args: Any, **kwargs: Any) -> Any:
    """A checkpointed block's forward, bound to the block (``bind_forward``); everything it
    needs is read from ``module``, so a copy of the block runs its own weights."""
    original = partial(type(module).forward, module)
    owner = module._slimfit_checkpointing.checkpointing
    position, x = _first_tensor(args, kwargs)
    if not torch.is_grad_enabled() or x is None:
        return original(*args, **kwargs)
    kwargs = _without_cache(module, kwargs)
    if not x.requires_grad:  # nothing below trains: torch's checkpoint keeps x itself
        return checkpoint(original, *args, use_reentrant=False, **kwargs)
    tag_role(x, module._slimfit_input_role)
    kept = _KeepForRecompute.apply(x)
    node = kept.grad_fn
    box = [kept]

    def run() -> Any:
        if box:  # the forward pass: the real input, then forget it
            call_args, call_kwargs = _replace(args, kwargs, position, box.pop())
            return original(*call_args, **call_kwargs)
        if owner is not None:
            owner.recomputations += 1
            for callback in owner.before_recompute:
                callback()
        value = node.saved_tensors[0].detach().requires_grad_(True)
        call_args, call_kwargs = _replace(args, kwargs, position, value)
        with _CountRecomputed(owner.counter if owner is not None else None):
            return original(*call_args, **call_kwargs)

    return checkpoint(run, use_reentrant=False)


def _without_cache(module: nn.Module, kwargs: dict) -> dict:
    """No key/value cache in a recomputed block (as transformers' own checkpointing does): a
    cache filled by the forward pass would make the recomputation skip work and save less."""
    kwargs = dict(kwargs)
    if kwargs.get("use_cache"):
        kwargs["use_cache"] = False
    if not getattr(module, "_can_checkpoint_with_cache", False):
        for key in ("cache", "layer_past", "past_key_value", "past_key_values"):
            if kwargs.get(key) is not None:
                kwargs[key] = None
    return kwargs


def _first_tensor(args: tuple, kwargs: dict) -> tuple[Any, torch.Tensor | None]:
    for index, value in enumerate(args):
        if isinstance(value, torch.Tensor):
            return index, value
    for key, value in kwargs.items():
        if isinstance(value, torch.Tensor):
            return key, value
    return None, None


def _replace(args: tuple, kwargs: dict, position: Any, value: torch.Tensor) -> tuple[tuple, dict]:
    if isinstance(position, int):
        return (*args[:position], value, *args[position + 1 :]), kwargs
    return args, {**kwargs, position: value}


class _CountRecomputed:
    """Adds what the recomputation saves to ``counter`` while those tensors are alive.

    The checkpoint's own saved-tensor hooks collect the recomputed tensors; these hooks sit
    inside them, count each tensor, and hand it on unchanged.
    """

    def __init__(self, counter: ByteCounter | None):
        self.counter = counter
        self._hooks = None

    def __enter__(self) -> None:
        top = getattr(torch._C._autograd, "_top_saved_tensors_default_hooks", None)
        hooks = top(False) if top is not None and self.counter is not None else None
        if hooks is None:
            return
        outer_pack, outer_unpack = hooks
        counter = self.counter

        def pack(tensor: torch.Tensor) -> Any:
            if isinstance(tensor, nn.Parameter) or isinstance(tensor._base, nn.Parameter):
                return outer_pack(tensor)  # weights are not activations
            nbytes = tensor_bytes(tensor)
            counter.add("recomputed", nbytes, nbytes)
            weakref.finalize(tensor, counter.release, nbytes, nbytes)
            return outer_pack(tensor)

        self._hooks = torch.autograd.graph.saved_tensors_hooks(pack, outer_unpack)
        self._hooks.__enter__()

    def __exit__(self, *exc: Any) -> None:
        if self._hooks is not None:
            self._hooks.__exit__(*exc)
            self._hooks = None
