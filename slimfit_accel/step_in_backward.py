"""The optimizer step in backward (``optimizer_step: in_backward``): each unit is updated as soon
as backward has completed its gradient, and that gradient is released at once.

An ordinary step holds every trained gradient at the end of backward. Here each trained parameter
has a post-accumulate-grad hook; once every parameter of a unit has its gradient, the unit is
stepped: the scorer sees its weights and gradients (``Scorer.before_step`` on that unit alone),
its optimizer state (and fp32 masters, ``master_weights: host``) is paged in (``optimizer_paging``;
on CUDA the unit expected next in backward order is prefetched on a side stream), the optimizer's
own update runs on its parameters alone (the param groups narrowed to them, ``lr_scale`` held for
the update), the state is paged out and the gradients are freed. A unit is stepped at the next
gradient hook or at the end of backward, so the memory meter's own hook has counted its last
gradient first. ``optimizer.step()`` in the user's loop then only does the bookkeeping: units whose
gradients never completed (a parameter unused in forward) are stepped, the scorer's ``after_step``
runs unit by unit in the controller's order, counters advance.

Exact: every parameter gets the optimizer's own arithmetic on its own gradient and state, as in
the ordinary step, so weights, state and scores are bit-identical for every ``torch.optim``
optimizer that updates each parameter from its own gradient (AdamW, Adam, SGD; not LBFGS), with
or without ``optimizer_paging`` and ``master_weights: host``.

Refused, with the reason, because an update in backward cannot wait for all gradients:
gradient accumulation (``gradient_accumulation_steps > 1`` at attach or Trainer start; a second
backward before ``optimizer.step()`` at that backward), gradient clipping (``torch.nn.utils`` and
``Accelerator`` ``clip_grad_norm_``/``clip_grad_value_`` raise when given a parameter stepped in
backward; the Trainer's ``max_grad_norm > 0`` at start), fp16 loss scaling (a GradScaler needs every
gradient for its inf check: Accelerate's fp16 at attach, a scaler handing a fused optimizer its scale
at the step; a plain GradScaler with another optimizer fails in torch's own ``unscale_``, after the
first update), closures, and several processes: DDP averages gradients in buckets after the hooks
have run (the hooks see this rank's gradient, not the average) and holds every gradient in those
buckets anyway; DeepSpeed and FSDP run their own step.

A norm asked for without clipping (``clip_grad_norm_(params, inf)``, which the Trainer calls every
step to log ``grad_norm``) is answered: each parameter's gradient norm is kept (one scalar, on its
device) as its unit is stepped.
"""

from __future__ import annotations

import functools
import math
import weakref
from typing import Any, Callable, Collection, Sequence

import torch
from torch.autograd import Variable

from .errors import IntegrationError, PluginError
from .hookspecs import UnitView
from .paging import OptimizerPaging
from .plugins import Built
from .stepping import StepCallback, UnitParams, scaled_lr
from .units import UnitSet

_KEY = "optimizer_step: in_backward"
_USE_DEFAULT = "or set optimizer_step: after_backward (the default)"


def refuse_unsupported(accelerator: Any, model: torch.nn.Module, sharding: int | None, row_chunks: bool = False) -> None:
    """Raise one line for a setup that cannot step in backward exactly (before training starts)."""
    import torch.distributed as dist
    from accelerate.utils import DistributedType

    kind = getattr(accelerator, "distributed_type", None)
    if kind == DistributedType.DEEPSPEED:
        reason = "DeepSpeed runs its own optimizer step over flat partitions"
    elif sharding:
        reason = f"FSDP{sharding} reduces and shards gradients after backward and runs its own step"
    elif isinstance(model, torch.nn.parallel.DistributedDataParallel) or (
        dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    ):
        reason = (
            "under DDP (or any multi-process run) the gradient hooks fire before the gradients are averaged "
            "across processes, and DDP's buckets hold every gradient anyway; train on one process"
        )
    elif getattr(accelerator, "gradient_accumulation_steps", 1) > 1:
        reason = (
            f"gradient_accumulation_steps={accelerator.gradient_accumulation_steps}: a unit is updated as soon as "
            "one backward completes its gradient, so gradients cannot accumulate; use gradient_accumulation_steps=1"
        )
    elif getattr(accelerator, "scaler", None) is not None or getattr(accelerator, "mixed_precision", "no") == "fp16":
        reason = "fp16 loss scaling needs every gradient for its inf check before any update; use bf16 or fp32"
    elif row_chunks:
        reason = "units.row_chunks steps one tensor's rows as several units; remove row_chunks"
    else:
        return
    raise IntegrationError(f"{_KEY} is not supported here: {reason}, {_USE_DEFAULT}.")


def refuse_trainer_arguments(args: Any) -> None:
    """The ``TrainingArguments`` that cannot step in backward, refused when training begins."""
    if getattr(args, "gradient_accumulation_steps", 1) > 1:
        reason = f"gradient_accumulation_steps={args.gradient_accumulation_steps}: gradients cannot accumulate; use 1"
    elif (getattr(args, "max_grad_norm", 0) or 0) > 0:
        reason = f"max_grad_norm={args.max_grad_norm} clips by the norm of every gradient, before any update; set max_grad_norm=0"
    elif getattr(args, "fp16", False):
        reason = "fp16 loss scaling needs every gradient for its inf check before any update; use bf16 or fp32"
    else:
        return
    raise IntegrationError(f"SlimFitCallback: {_KEY} is not supported here: {reason}, {_USE_DEFAULT}.")


class UnitByUnitScorer:
    """The scorer called one unit at a time: ``before_step`` as each unit's gradient completes in
    backward (``unit_ready``), ``after_step`` unit by unit in the controller's order after the step.
    Built-in scorers score each unit from its own tensors, so the scores equal one call over all
    units (``random`` draws in the same order). Other attributes (``state_dict``) are the scorer's."""

    def __init__(self, built: Built):
        self.inner = built.strategy
        self._built = built
        self._carried: dict[str, Any] = {}

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def unit_ready(self, view: UnitView) -> None:
        try:
            self._carried[view.name] = self.inner.before_step([view])
        except Exception as err:
            raise PluginError(
                self._built.registration.plugin, f"{self._built.label} raised in before_step: {type(err).__name__}: {err}"
            ) from err

    def before_step(self, views: Sequence[UnitView]) -> dict[str, Any]:
        carried, self._carried = self._carried, {}
        return carried

    def after_step(self, views: Sequence[UnitView], carried: dict[str, Any]) -> torch.Tensor:
        scores = [torch.as_tensor(self.inner.after_step([view], carried.get(view.name))).reshape(-1) for view in views]
        return torch.cat(scores) if scores else torch.zeros(0)

    def forget(self) -> None:
        """Drop what was kept for a step that raised."""
        self._carried = {}


class InBackwardStepBackend:
    """``StepBackend`` that updates each unit in backward; see the module docstring.

    ``units``: the model's units (a unit is stepped once all its parameters have gradients);
    optimizer parameters in no unit are stepped alone. ``paging``: stream each unit's state (and
    masters) through its update.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, units: UnitSet, paging: OptimizerPaging | None = None):
        self.optimizer = optimizer
        self.paging = paging
        self.scoring: UnitByUnitScorer | None = None
        in_optimizer = [p for group in optimizer.param_groups for p in group["params"]]
        in_units = {id(p) for unit in units.all for p in unit.params}
        # Stepping groups: the units, then each optimizer parameter in no unit on its own.
        self._groups: list[tuple[str | None, tuple[torch.nn.Parameter, ...]]] = [(u.name, u.params) for u in units.all]
        self._groups += [(None, (p,)) for p in in_optimizer if id(p) not in in_units]
        self._schedulable = len(units.schedulable)
        self._group_of = {id(p): i for i, (_, params) in enumerate(self._groups) for p in params}
        self._names = {id(p): n for unit in units.all for n, p in zip(unit.param_names, unit.params)}
        self._in_optimizer = {id(p) for p in in_optimizer}
        self._scored: set[int] = set(range(self._schedulable))
        self._frozen: tuple[torch.nn.Parameter, ...] = ()
        self._handles: list = []
        self._lr_scale = 1.0
        self._order = list(reversed(range(len(self._groups))))  # expected backward order (for prefetch)
        self._position = {group: i for i, group in enumerate(self._order)}
        self._new_step()

    def _new_step(self) -> None:
        self._ready: dict[int, set[int]] = {}
        self._pending: list[int] = []
        self._stepped: set[int] = set()  # ids of parameters stepped since the last optimizer.step()
        self._done: list[int] = []  # groups stepped, in order
        self._prefetched: set[int] = set()
        self._queued = False
        self._norms: dict[int, torch.Tensor] = {}  # id(param) -> 2-norm of the gradient it was stepped with

    # ---------------------------------------------------------------- wiring
    def scorer_for(self, built: Built) -> Built:
        """The controller's scorer: ``built`` called unit by unit (see ``UnitByUnitScorer``)."""
        self.scoring = UnitByUnitScorer(built)
        return Built(self.scoring, built.registration)

    def install(self, before_step: StepCallback, after_step: StepCallback, lr_scale: float = 1.0) -> None:
        if getattr(type(self.optimizer).step, "__wrapped__", None) is None:
            raise IntegrationError(
                f"{type(self.optimizer).__name__}.step is not wrapped by torch's optimizer hooks "
                "(does its __init__ call torch.optim.Optimizer.__init__?); SlimFit cannot step it."
            )
        self._lr_scale = lr_scale
        for _, params in self._groups:
            for param in params:
                self._handles.append(_hook_gradient(param, self._gradient_ready))

        def pre_hook(optimizer, args, kwargs):
            try:
                _refuse_step(optimizer, args, kwargs)
                for param in self._frozen:
                    param.grad = None
                self._flush()
                for index, (_, params) in enumerate(self._groups):  # units whose gradients never completed
                    if index not in self._done and (index in self._scored or any(p.grad is not None for p in params)):
                        self._step_group(index)
                before_step()
            except BaseException:
                self._abandon()
                raise

        def post_hook(optimizer, args, kwargs):
            done = self._done
            stepped = set(done)
            self._order = done + [i for i in self._order if i not in stepped]  # as backward ran this step
            self._position = {group: i for i, group in enumerate(self._order)}
            self._new_step()
            if self.paging is not None:
                self.paging.drop_prefetched()
            after_step()

        self._handles += [
            self.optimizer.register_step_pre_hook(pre_hook),
            self.optimizer.register_step_post_hook(post_hook),
        ]
        if self.paging is not None:
            self.paging.install(step_hooks=False)  # the units are stepped here
        _CLIP_GUARD.add(self)

    def remove(self) -> None:
        _CLIP_GUARD.discard(self)
        for handle in self._handles:
            handle.remove()
        self._handles = []
        if self.paging is not None:
            self.paging.remove()

    def set_frozen(self, frozen: Collection[torch.nn.Parameter]) -> None:
        self._frozen = tuple(frozen)
        frozen_ids = {id(p) for p in self._frozen}
        self._scored = {i for i in range(self._schedulable) if not any(id(p) in frozen_ids for p in self._groups[i][1])}
        if self.paging is not None:
            self.paging.evict()

    def views(self, units: Sequence[UnitParams]) -> list[UnitView]:
        # Gradients are gone: the scorer saw them unit by unit in backward.
        return [UnitView(name=name, weights=[p.detach() for p in params], grads=[p.grad for p in params]) for name, params in units]

    def grad_norm(self, parameters: Sequence[torch.Tensor]) -> torch.Tensor:
        """The 2-norm of ``parameters``' gradients in this step, those already stepped in backward
        (their norms were kept) and those still held, as ``clip_grad_norm_(parameters, inf)``
        would have returned it before the updates."""
        norms = [self._norms[id(p)] if id(p) in self._norms else torch.linalg.vector_norm(p.grad, 2.0, dtype=torch.float32)
                 for p in parameters if id(p) in self._norms or p.grad is not None]
        if not norms:
            return torch.zeros(())
        device = norms[0].device
        return torch.linalg.vector_norm(torch.stack([n.to(device) for n in norms]), 2.0)

    @property
    def param_groups(self) -> list[dict]:
        return self.optimizer.param_groups

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    # ---------------------------------------------------------------- backward
    def _gradient_ready(self, param: torch.Tensor) -> None:
        key = id(param)
        if key in self._stepped:
            name = self._names.get(key, f"of shape {tuple(param.shape)}")
            raise IntegrationError(
                f"{_KEY}: parameter {name} got a second gradient before optimizer.step() (gradient accumulation, "
                "or a parameter used again after reentrant checkpointing), but it was already updated with the "
                f"first; call optimizer.step() after every backward, {_USE_DEFAULT}."
            )
        self._flush()  # the previous unit: every hook on its last gradient has run
        index = self._group_of[key]
        ready = self._ready.setdefault(index, set())
        ready.add(key)
        if all(id(p) in ready for p in self._groups[index][1] if p.requires_grad):
            self._pending.append(index)
        if not self._queued:
            self._queued = True
            Variable._execution_engine.queue_callback(self._end_of_backward)

    def _end_of_backward(self) -> None:
        self._queued = False
        self._flush()

    def _flush(self) -> None:
        while self._pending:
            self._step_group(self._pending.pop(0))

    def _step_group(self, index: int) -> None:
        name, params = self._groups[index]
        if index in self._scored and self.scoring is not None:
            self.scoring.unit_ready(UnitView(name=name, weights=[p.detach() for p in params], grads=[p.grad for p in params]))
        stepped = [p for p in params if p.grad is not None and id(p) in self._in_optimizer]
        for param in stepped:  # for grad_norm(): one scalar per parameter, on its device
            self._norms[id(param)] = torch.linalg.vector_norm(param.grad, 2.0, dtype=torch.float32)
        if stepped:
            with scaled_lr(self.optimizer.param_groups, self._lr_scale):
                if self.paging is not None:
                    self.paging.step_params(stepped)
                else:
                    _update_alone(self.optimizer, stepped)
        self._stepped.update(id(p) for p in params)
        self._done.append(index)
        self._prefetch_after(index)

    def _prefetch_after(self, index: int) -> None:
        """On CUDA, page in the state of the unit expected next in backward order."""
        if self.paging is None or not self._groups[index][1][0].is_cuda:
            return
        for candidate in self._order[self._position[index] + 1:]:
            params = [p for p in self._groups[candidate][1] if p.requires_grad and id(p) in self._in_optimizer]
            if candidate in self._done or candidate in self._prefetched or not params:
                continue
            self._prefetched.add(candidate)
            self.paging.prefetch(params)
            return

    def _abandon(self) -> None:
        """After a step that raised: nothing carried into the next one."""
        self._new_step()
        if self.scoring is not None:
            self.scoring.forget()
        if self.paging is not None:
            self.paging.drop_prefetched()


def _refuse_step(optimizer: torch.optim.Optimizer, args: tuple, kwargs: dict) -> None:
    """What ``optimizer.step()`` may not bring when the units were updated in backward."""
    closure = kwargs.get("closure", args[1] if len(args) > 1 else None)
    if closure is not None:
        raise IntegrationError(
            f"{_KEY} updates each unit in backward, so a step with a closure (which computes the "
            f"gradients inside the step) cannot run: call optimizer.step() without one, {_USE_DEFAULT}."
        )
    if any(isinstance(getattr(optimizer, name, None), torch.Tensor) for name in ("grad_scale", "found_inf")):
        raise IntegrationError(
            f"{_KEY}: a GradScaler is stepping this optimizer, but its inf check needs every gradient "
            f"before any update; train in bf16 or fp32 without loss scaling, {_USE_DEFAULT}."
        )


def _update_alone(optimizer: torch.optim.Optimizer, params: list[torch.Tensor]) -> None:
    """The optimizer's own update on ``params`` only (each in its param group), gradients released."""
    update = type(optimizer).step.__wrapped__
    groups = optimizer.param_groups
    saved = [group["params"] for group in groups]
    wanted = {id(p) for p in params}
    try:
        for group, group_params in zip(groups, saved):
            group["params"] = [p for p in group_params if id(p) in wanted]
        update(optimizer)
    finally:
        for group, group_params in zip(groups, saved):
            group["params"] = group_params
    for param in params:
        param.grad = None


def _hook_gradient(param: torch.nn.Parameter, hook: Callable[[torch.Tensor], None]):
    """A post-accumulate-grad hook on ``param``, also when it does not require grad now (torch
    hooks only tensors that do: flipped for the call; the hook stays through later flips)."""
    frozen = not param.requires_grad
    if frozen:
        param.requires_grad_(True)
    try:
        return param.register_post_accumulate_grad_hook(hook)
    finally:
        if frozen:
            param.requires_grad_(False)


class _ClipGuard:
    """Gradient clipping raises when given a parameter that an in-backward backend steps: its
    gradient is gone (clipping would see none and report a norm of 0), and a global norm needs
    every gradient before any update. Guards ``torch.nn.utils.clip_grad_norm_``/``clip_grad_value_``
    and the ``Accelerator`` methods of those names (which the Trainer calls), while a backend is
    attached; they are restored when the last one is removed."""

    def __init__(self) -> None:
        self._backends: weakref.WeakSet = weakref.WeakSet()
        self._originals: dict[tuple[Any, str], Callable] = {}

    @staticmethod
    def _targets() -> list[tuple[Any, str, int]]:
        """(owner, attribute, position of the parameters argument)."""
        from accelerate import Accelerator

        names = ("clip_grad_norm_", "clip_grad_value_")
        return [(torch.nn.utils, name, 0) for name in names] + [(Accelerator, name, 1) for name in names]

    def add(self, backend: InBackwardStepBackend) -> None:
        self._backends.add(backend)
        if not self._originals:
            for owner, name, position in self._targets():
                self._originals[(owner, name)] = original = owner.__dict__[name]
                setattr(owner, name, self._guarded(name, original, position))

    def discard(self, backend: InBackwardStepBackend) -> None:
        self._backends.discard(backend)
        if not self._backends and self._originals:
            for (owner, name), original in self._originals.items():
                setattr(owner, name, original)
            self._originals = {}

    def _guarded(self, name: str, original: Callable, position: int) -> Callable:
        @functools.wraps(original)
        def guarded(*args, **kwargs):
            args = list(args)
            parameters = args[position] if len(args) > position else kwargs.pop("parameters")
            parameters = [parameters] if isinstance(parameters, torch.Tensor) else list(parameters)
            args[position:position + 1] = [parameters]
            ids = {id(p) for p in parameters}
            backends = [b for b in list(self._backends) if ids & b._in_optimizer]  # noqa: SLF001
            if not backends:
                return original(*args, **kwargs)
            max_norm = args[position + 1] if len(args) > position + 1 else kwargs.get("max_norm")
            norm_type = args[position + 2] if len(args) > position + 2 else kwargs.get("norm_type", 2)
            if name == "clip_grad_norm_" and max_norm is not None and math.isinf(max_norm) and float(norm_type) == 2.0:
                return backends[0].grad_norm(parameters)  # a norm asked for, nothing clipped (the Trainer's log)
            raise IntegrationError(
                f"{_KEY}: {name} was called, but each unit was already updated in backward and its gradient "
                f"freed, and clipping needs every gradient before any update; remove the clipping "
                f"(Trainer: max_grad_norm=0), {_USE_DEFAULT}."
            )

        return guarded


_CLIP_GUARD = _ClipGuard()
