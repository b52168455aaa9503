"""Freeze-true optimizer stepping: the frozen set's weights and optimizer state do not move.

A ``StepBackend`` sits between the controller and one kind of optimizer. It runs the
controller's callbacks around every *real* optimizer step (skipped fp16 steps and accumulation
micro-batches do not count), makes sure frozen parameters are left untouched by that step, and
gives scorers this rank's view of the trained units' weights and gradients.

``TorchStepBackend`` covers every plain ``torch.optim`` optimizer, on one device or under DDP:
torch optimizers skip parameters whose ``.grad`` is None, so clearing frozen gradients before the
step is enough (a zero gradient is not: Adam momentum and decoupled weight decay would still
move the weights). With ``paging`` (``optimizer_paging: true``) it also keeps the optimizer
state in host memory and streams the trained set's state through the step (``paging.py``), and
with ``master_weights: host`` the fp32 master weights of a bf16 model with it
(``master_weights.py``). DeepSpeed ZeRO has its own backend in ``integrations/deepspeed.py``.

The backend runs the optimizer's update itself, in its step pre-hook, so that it can hold
``lr_scale`` for exactly the length of the update (try/finally: an update that raises, e.g. on
out-of-memory, leaves the user's rate as it was); the optimizer's own step then finds no gradient
and changes nothing, and the gradients are put back after it. A GradScaler verdict handed to a
fused optimizer (``optimizer.found_inf``: the scaler calls ``step()`` even on inf gradients and
the kernel skips the update) makes the step a skipped one: no callback runs, nothing changes.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Collection, Iterator, Protocol, Sequence

import torch

from .errors import IntegrationError
from .hookspecs import UnitView
from .paging import OptimizerPaging

StepCallback = Callable[[], None]
UnitParams = tuple[str, Sequence[torch.nn.Parameter]]


class StepBackend(Protocol):
    """What the controller needs from an optimizer, whatever runs the step."""

    def install(self, before_step: StepCallback, after_step: StepCallback, lr_scale: float = 1.0) -> None:
        """Call ``before_step`` just before and ``after_step`` just after each real step, and
        run each update with every param group's ``lr`` times ``lr_scale`` (restored after the
        update, whether it returns or raises)."""

    def set_frozen(self, frozen: Collection[torch.nn.Parameter]) -> None:
        """Record the parameters frozen until the next call (``requires_grad`` is already off)."""

    def views(self, units: Sequence[UnitParams]) -> list[UnitView]:
        """This rank's weights (and, before the step, gradients) of the given units."""

    def remove(self) -> None:
        """Undo ``install``: the optimizer behaves as it did before."""

    @property
    def param_groups(self) -> list[dict]:
        """The param groups of the optimizer that applies the update (their ``lr`` is used)."""

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


class TorchStepBackend:
    """Freeze-true stepping for ``torch.optim`` optimizers (single device, DDP).

    Example::

        backend = TorchStepBackend(optimizer)
        backend.install(before_step=lambda: ..., after_step=lambda: ..., lr_scale=2.0)
        backend.set_frozen(frozen_params)
    """

    def __init__(self, optimizer: torch.optim.Optimizer, paging: OptimizerPaging | None = None):
        self.optimizer = optimizer
        self.paging = paging
        self._frozen: tuple[torch.nn.Parameter, ...] = ()
        self._handles: list = []
        self._held: list[tuple[torch.Tensor, torch.Tensor]] = []  # (param, grad) kept from the no-op step
        self._skipped = False

    def install(self, before_step: StepCallback, after_step: StepCallback, lr_scale: float = 1.0) -> None:
        # torch wraps every optimizer class's step with its hooks; __wrapped__ is the bare update.
        update = getattr(type(self.optimizer).step, "__wrapped__", None)
        if update is None:
            raise IntegrationError(
                f"{type(self.optimizer).__name__}.step is not wrapped by torch's optimizer hooks "
                "(does its __init__ call torch.optim.Optimizer.__init__?); SlimFit cannot step it."
            )

        def pre_hook(optimizer, args, kwargs):
            self._held = []  # from a step that raised after this hook: stale
            # A frozen parameter may still hold a gradient (zero_grad(set_to_none=False), or a
            # gradient from the last step it was trained): drop it so the optimizer skips it.
            for param in self._frozen:
                param.grad = None
            self._skipped = scaler_found_inf(optimizer)
            if self._skipped:  # the update would change nothing: it does not run at all
                self._hold_grads()
                return None
            unscale_for_fused_step(optimizer)
            before_step()  # scorers read the gradients here, before paging releases them
            closure = kwargs.get("closure", args[1] if len(args) > 1 else None)
            with scaled_lr(optimizer.param_groups, lr_scale):
                if self.paging is not None:
                    self.paging.stream_step(args, kwargs)  # with a closure: only brings the state in
                loss = update(*args, **kwargs) if self.paging is None or closure is not None else None
            self._hold_grads()  # the optimizer's own step now finds nothing to update
            if closure is not None:
                return (optimizer,), {"closure": lambda: loss}  # not run a second time
            return None

        def post_hook(optimizer, args, kwargs):
            self._restore_grads()
            if not self._skipped:
                after_step()
            if self.paging is not None:
                self.paging.evict()  # after a step with a closure, which is not streamed

        self._handles = [
            self.optimizer.register_step_pre_hook(pre_hook),
            self.optimizer.register_step_post_hook(post_hook),
        ]
        if self.paging is not None:
            self.paging.install(step_hooks=False)  # the hooks above stream the step

    def _hold_grads(self) -> None:
        for group in self.optimizer.param_groups:
            for param in group["params"]:
                if param.grad is not None:
                    self._held.append((param, param.grad))
                    param.grad = None

    def _restore_grads(self) -> None:
        held, self._held = self._held, []
        for param, grad in held:
            if param.grad is None:
                param.grad = grad

    @property
    def param_groups(self) -> list[dict]:
        return self.optimizer.param_groups

    def set_frozen(self, frozen: Collection[torch.nn.Parameter]) -> None:
        self._frozen = tuple(frozen)
        if self.paging is not None:
            self.paging.evict()  # e.g. state that load_state put back on the device

    def views(self, units: Sequence[UnitParams]) -> list[UnitView]:
        return [
            UnitView(name=name, weights=[p.detach() for p in params], grads=[p.grad for p in params])
            for name, params in units
        ]

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        if self.paging is not None:
            self.paging.remove()  # state back on the device; fp32 masters back in the parameters

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


@contextmanager
def scaled_lr(param_groups: Sequence[dict], scale: float) -> Iterator[None]:
    """Every group's ``lr`` times ``scale`` for the block, then exactly the value it had, also
    when the block raises. Only the update sees the scaled rate; LR schedulers never do."""
    if scale == 1.0:
        yield
        return
    saved = [(group, group["lr"]) for group in param_groups]
    for group, lr in saved:
        group["lr"] = lr * scale
    try:
        yield
    finally:
        for group, lr in saved:
            group["lr"] = lr


def scaler_found_inf(optimizer: torch.optim.Optimizer) -> bool:
    """Whether a GradScaler told this (fused) optimizer that the step's gradients overflowed.

    For optimizers with ``_step_supports_amp_scaling`` (``fused=True``), ``GradScaler.step``
    calls ``optimizer.step()`` even when it found inf/NaN gradients, with ``optimizer.found_inf``
    set for the kernel to skip the update; other optimizers are not called at all then. Reading
    the verdict costs one device sync per step (as the scaler's own non-fused path does).
    """
    found_inf = getattr(optimizer, "found_inf", None)
    return isinstance(found_inf, torch.Tensor) and bool(found_inf.item() != 0)


def unscale_for_fused_step(optimizer: torch.optim.Optimizer) -> None:
    """Unscale the gradients a GradScaler left scaled for a fused optimizer, so scorers read
    true gradients (as they do for other optimizers, which the scaler unscales before the step).

    ``GradScaler.step`` hands a fused optimizer ``optimizer.grad_scale`` for its kernel to divide
    by; dividing here and clearing it is what ``scaler.unscale_(optimizer)`` before the step would
    have led to (the scaler then passes no scale either).
    """
    scale = getattr(optimizer, "grad_scale", None)
    if not isinstance(scale, torch.Tensor):
        return
    by_device: dict[torch.device, list[torch.Tensor]] = {}
    for group in optimizer.param_groups:
        for param in group["params"]:
            if param.grad is not None:
                by_device.setdefault(param.grad.device, []).append(param.grad)
    for device, grads in by_device.items():
        torch._foreach_div_(grads, scale.to(device))
    optimizer.grad_scale = None


def reentrant_checkpointing(model: torch.nn.Module) -> bool:
    """Whether ``model`` uses transformers' gradient checkpointing with ``use_reentrant=True``.

    DDP cannot run it with ``find_unused_parameters=True`` (which frozen units need): the
    reentrant backward marks parameters ready a second time. Models enable it with
    ``gradient_checkpointing_enable``, which leaves a ``functools.partial`` of
    ``torch.utils.checkpoint.checkpoint`` on each checkpointed module; torch's default when the
    keyword is missing is reentrant.
    """
    for module in model.modules():
        if getattr(module, "gradient_checkpointing", False) is True:
            function = getattr(module, "_gradient_checkpointing_func", None)
            keywords = getattr(function, "keywords", None) or {}
            if keywords.get("use_reentrant", True):
                return True
    return False

