"""Freeze-true optimizer stepping: the frozen set's weights and optimizer state do not move.

A ``StepBackend`` sits between the controller and one kind of optimizer. It runs the
controller's callbacks around every *real* optimizer step (skipped fp16 steps and accumulation
micro-batches do not count), makes sure frozen parameters are left untouched by that step, and
gives scorers this rank's view of the trained units' weights and gradients.

``TorchStepBackend`` covers every plain ``torch.optim`` optimizer, on one device or under DDP:
torch optimizers skip parameters whose ``.grad`` is None, so clearing frozen gradients before the
step is enough (a zero gradient is not: Adam momentum and decoupled weight decay would still
move the weights). With ``paging`` (``optimizer_paging: true``) it also keeps the optimizer
state in host memory and streams the trained set's state through the step (``paging.py``). DeepSpeed ZeRO has its own backend in
``integrations/deepspeed.py``.
"""

from __future__ import annotations

from typing import Callable, Collection, Protocol, Sequence

import torch

from .hookspecs import UnitView
from .paging import OptimizerPaging

StepCallback = Callable[[], None]
UnitParams = tuple[str, Sequence[torch.nn.Parameter]]


class StepBackend(Protocol):
    """What the controller needs from an optimizer, whatever runs the step."""

    def install(self, before_step: StepCallback, after_step: StepCallback) -> None:
        """Call ``before_step`` just before and ``after_step`` just after each real step."""

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
        backend.install(before_step=lambda: ..., after_step=lambda: ...)
        backend.set_frozen(frozen_params)
    """

    def __init__(self, optimizer: torch.optim.Optimizer, paging: OptimizerPaging | None = None):
        self.optimizer = optimizer
        self.paging = paging
        self._frozen: tuple[torch.nn.Parameter, ...] = ()
        self._handles: list = []

    def install(self, before_step: StepCallback, after_step: StepCallback) -> None:
        def pre_hook(optimizer, args, kwargs):
            # A frozen parameter may still hold a gradient (zero_grad(set_to_none=False), or a
            # gradient from the last step it was trained): drop it so the optimizer skips it.
            for param in self._frozen:
                param.grad = None
            before_step()  # scorers read the gradients here, before paging releases them
            if self.paging is not None:
                self.paging.stream_step(args, kwargs)

        def post_hook(optimizer, args, kwargs):
            after_step()
            if self.paging is not None:
                self.paging.evict()  # after a step with a closure, which is not streamed

        self._handles = [
            self.optimizer.register_step_pre_hook(pre_hook),
            self.optimizer.register_step_post_hook(post_hook),
        ]

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
            self.paging.resident_all()

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


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

