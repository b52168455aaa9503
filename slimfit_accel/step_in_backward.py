"""The optimizer step in backward (``optimizer_step: in_backward``): each unit is updated as soon
as backward has completed its gradient, and that gradient is released at once.

An ordinary step holds every trained gradient at the end of backward. Here each trained parameter
has a post-accumulate-grad hook; once every parameter of a unit has its gradient, the unit is
stepped: the scorer sees its weights and gradients (``Scorer.before_step`` on that unit alone),
its optimizer state (and fp32 masters, ``master_weights: host``) is paged in (``optimizer_paging``;
on CUDA the unit expected next in backward order is prefetched on a side stream), the optimizer's
own update runs on its parameters alone (the param groups narrowed to them, ``lr_scale`` held for
the update), the state is paged out and the gradients are freed. A unit is stepped at the next
gradient hook, before a checkpointed block is recomputed (``checkpointing.py``) or at the end of
backward, so the memory meter's own hook has counted its last gradient first.
``optimizer.step()`` in the user's loop then only does the bookkeeping: units whose gradients
never completed (a parameter unused in forward) are stepped, the scorer's ``after_step`` runs
unit by unit in the controller's order, counters advance.

Under DDP (``accelerator.prepare``, or the Trainer's wrapper) a unit must be stepped with the
gradient averaged over processes, which exists only once DDP has reduced the buckets holding it.
SlimFit registers DDP's communication hook (``_reduce_bucket``; DDP takes one, for good): it
averages exactly as DDP does without a hook (each gradient times 1/world size as it is copied into
the bucket, then an all-reduce sum) and hands the bucket to the backend. The local gradients of
the bucket's parameters are released there (the bucket holds their copy); at every later gradient
hook, and at the end of backward for the rest, each bucket whose all-reduce has completed is taken,
in launch order, on the autograd thread: its parameters' ``.grad`` become views of the averaged
bucket, and each unit whose trained parameters are all averaged is stepped, so a unit spanning
several buckets waits for the last. A stepped parameter's ``.grad`` is left as its bucket view
(DDP's own end of backward then copies the bucket onto itself, allocating nothing) and cleared at
``optimizer.step()``. A parameter this process did not use (outside the graph) is left to DDP,
which gives it the average when another process used it and no gradient when none did, exactly as
in the ordinary step; its unit is stepped at ``optimizer.step()``. Frozen units are unused on every
process (``find_unused_parameters``), so DDP gives them no gradient. Detached, the hook stays and
averages as DDP's own does. DDP's buckets hold a gradient copy of every parameter it was built
with in both modes (the meter does not count them); the step in backward keeps at most a bucket's
worth (``bucket_cap_mb``) of gradients of its own beyond them, instead of every trained gradient.
On CUDA the averaged bucket is waited for on the current stream (no host sync), which orders the
rest of backward after that all-reduce.

Exact: every parameter gets the optimizer's own arithmetic on its own gradient and state, as in
the ordinary step, so weights, state and scores are bit-identical for every ``torch.optim``
optimizer that updates each parameter from its own gradient (AdamW, Adam, SGD; not LBFGS), with
or without ``optimizer_paging`` and ``master_weights: host``, on one process or under DDP (whose
gradients are averaged as DDP averages them; with ``gradient_as_bucket_view`` and gradients kept
between steps, ``zero_grad(set_to_none=False)``, DDP divides instead of multiplying by 1/world size,
which is the same only for a power-of-two world size).

Refused, with the reason, because an update in backward cannot wait for all gradients:
gradient accumulation (``gradient_accumulation_steps > 1`` at attach or Trainer start; a second
backward before ``optimizer.step()`` at that backward; a backward under DDP's ``no_sync``, or
through the bare module, at the end of that backward; DDP's ``join()``, at the first bucket), gradient clipping (``torch.nn.utils`` and
``Accelerator`` ``clip_grad_norm_``/``clip_grad_value_`` raise when given a parameter stepped in
backward; the Trainer's ``max_grad_norm > 0`` at start), fp16 loss scaling (a GradScaler needs every
gradient for its inf check: Accelerate's fp16 at attach, a scaler handing a fused optimizer its scale
at the step; a plain GradScaler with another optimizer fails in torch's own ``unscale_``, after the
first update), closures, DDP set up to reduce otherwise (a communication hook of the user's,
``static_graph``, DDP's own ``mixed_precision``, ``skip_all_reduce_unused_params``, delayed
all-reduce, the compiled reducer), several processes without DDP, and DeepSpeed and FSDP, which
reduce (and shard) gradients and run their own step.

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
    ddp = ddp_of(accelerator, model)
    reason = None
    if kind == DistributedType.DEEPSPEED:
        reason = "DeepSpeed runs its own optimizer step over flat partitions"
    elif sharding:
        reason = f"FSDP{sharding} reduces and shards gradients after backward and runs its own step"
    elif ddp is not None:
        reason = _ddp_refusal(ddp)
    elif dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        reason = (
            f"{dist.get_world_size()} processes run but the model is not wrapped in DistributedDataParallel, whose "
            "buckets the units are stepped from once averaged; wrap it in DDP (accelerator.prepare does)"
        )
    fp16 = getattr(accelerator, "scaler", None) is not None or getattr(accelerator, "mixed_precision", "no") == "fp16"
    if reason is not None:
        pass
    elif getattr(accelerator, "gradient_accumulation_steps", 1) > 1:
        reason = (
            f"gradient_accumulation_steps={accelerator.gradient_accumulation_steps}: a unit is updated as soon as "
            "one backward completes its gradient, so gradients cannot accumulate; use gradient_accumulation_steps=1"
        )
    elif fp16:
        reason = "fp16 loss scaling needs every gradient for its inf check before any update; use bf16 or fp32"
    elif row_chunks:
        reason = "units.row_chunks steps one tensor's rows as several units; remove row_chunks"
    if reason is not None:
        raise IntegrationError(f"{_KEY} is not supported here: {reason}, {_USE_DEFAULT}.")


def ddp_of(accelerator: Any, model: torch.nn.Module) -> torch.nn.parallel.DistributedDataParallel | None:
    """The DDP wrapper of ``model``: ``model`` itself, or the one the Trainer's callbacks are not
    given (``accelerator.ddp_model``, found by ``SlimFitCallback``)."""
    if isinstance(model, torch.nn.parallel.DistributedDataParallel):
        return model
    return getattr(accelerator, "ddp_model", None)


def _ddp_refusal(ddp: torch.nn.parallel.DistributedDataParallel) -> str | None:
    """What DDP setting keeps the units from being stepped exactly from its averaged buckets."""
    hooks = [hook for hook, _ in getattr(ddp, "_comm_hooks", []) if hook is not _reduce_bucket]
    if hooks:
        return (
            f"DDP already has a communication hook ({getattr(hooks[0], '__qualname__', hooks[0])}), but the units are "
            "stepped from DDP's plain averaged buckets; remove it (Accelerate: DistributedDataParallelKwargs(comm_hook=NO))"
        )
    settings = {
        "static_graph=True": getattr(ddp, "static_graph", False),
        "mixed_precision": getattr(ddp, "mixed_precision", None) is not None,
        "skip_all_reduce_unused_params=True": getattr(ddp, "skip_all_reduce_unused_params", False),
        "delay_all_reduce_named_params": bool(getattr(ddp, "_delay_all_reduce_params", None)),
        "the compiled (python_reducer) DDP": getattr(ddp, "_use_python_reducer", False),
    }
    named = [name for name, on in settings.items() if on]
    if named:
        return f"DDP was built with {named[0]}, which changes how and when buckets are reduced; build it without"
    return None


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
    masters) through its update. ``ddp``: the model's DDP wrapper; a unit is then stepped once
    every bucket holding its parameters is averaged across processes (see the module docstring).
    """

    def __init__(
        self, optimizer: torch.optim.Optimizer, units: UnitSet, paging: OptimizerPaging | None = None,
        ddp: torch.nn.parallel.DistributedDataParallel | None = None,
    ):
        self.optimizer = optimizer
        self.paging = paging
        self.ddp = ddp
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
        # Parameters DDP reduces (trainable when it was built, not ignored): stepped from its buckets.
        self._managed: set[int] = set()
        if ddp is not None:
            ignored = getattr(ddp, "parameters_to_ignore", ())
            self._managed = {id(p) for n, p in ddp.module.named_parameters() if p.requires_grad and n not in ignored}
        self._bridge: _BucketBridge | None = None
        self.counts = {"backward": 0, "step": 0}  # units updated in backward, and at optimizer.step()
        self._new_step()

    def _new_step(self) -> None:
        self._ready: dict[int, set[int]] = {}
        self._pending: list[int] = []
        self._stepped: set[int] = set()  # ids of parameters stepped since the last optimizer.step()
        self._done: list[int] = []  # groups stepped, in order
        self._prefetched: set[int] = set()
        self._queued = False
        self._norms: dict[int, torch.Tensor] = {}  # id(param) -> 2-norm of the gradient it was stepped with
        # Under DDP: parameters whose local gradient arrived, buckets launched and not yet taken
        # (future, parameters, gradient views), averaged gradients taken (id -> (param, bucket view)).
        self._arrived: set[int] = set()
        self._buckets: list[tuple[Any, list[torch.Tensor], list[torch.Tensor]]] = []
        self._reduced: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self._launched = False

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
                self._take_buckets(wait=True)
                # Units whose gradients never completed in backward; under DDP also those with a
                # parameter unused on this process (DDP has now given it the average, or no gradient).
                for index, (_, params) in enumerate(self._groups):
                    if index not in self._done and (index in self._scored or any(p.grad is not None for p in params)):
                        self._step_group(index, at_step=True)
                for param, _ in self._reduced.values():  # bucket views left for DDP's finalization
                    param.grad = None
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
        if self.ddp is not None:
            self._bridge = _BucketBridge.of(self.ddp)
            self._bridge.backend = self
        _CLIP_GUARD.add(self)

    def remove(self) -> None:
        if self._bridge is not None:  # DDP keeps the hook: it averages as DDP's own from now on
            self._bridge.backend = None
            self._bridge = None
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
        return [UnitView(name=name, weights=[p.detach() for p in params], grads=[p.grad for p in params])
                for name, params in units]

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
        self._take_buckets()
        if key in self._managed:  # stepped once its bucket is averaged
            self._arrived.add(key)
        else:
            self._mark_usable(key)
        self._queue_end_of_backward()

    def _mark_usable(self, key: int) -> None:
        """``key``'s gradient is final: its unit is stepped once all its trained parameters' are."""
        index = self._group_of[key]
        ready = self._ready.setdefault(index, set())
        ready.add(key)
        if all(id(p) in ready for p in self._groups[index][1] if p.requires_grad):
            self._pending.append(index)

    def _queue_end_of_backward(self) -> None:
        if not self._queued:
            self._queued = True
            Variable._execution_engine.queue_callback(self._end_of_backward)

    def _end_of_backward(self) -> None:
        self._queued = False
        self._flush()
        if self.ddp is not None and not self._launched and self._arrived:
            self._abandon()
            raise IntegrationError(
                f"{_KEY}: backward ran under DDP without reducing any bucket (model.no_sync(), or a forward that "
                "bypassed the DDP wrapper), so the units would be updated with this process's gradients alone; "
                f"call backward outside no_sync, through the DDP model, {_USE_DEFAULT}."
            )
        self._take_buckets(wait=True)  # DDP's own finalization runs after this callback

    # ---------------------------------------------------------------- DDP buckets
    def bucket_launched(self, future: Any, bucket: Any) -> None:
        """DDP started averaging ``bucket`` (``_reduce_bucket``): the local gradients of the
        parameters stepped here are released (the bucket holds their copy)."""
        self._launched = True
        params, grads = bucket.parameters(), bucket.gradients()
        for param in params:
            if id(param) in self._arrived and id(param) in self._group_of:
                param.grad = None
        self._buckets.append((future, params, grads))
        self._queue_end_of_backward()
        self._take_buckets()

    def _take_buckets(self, wait: bool = False) -> None:
        """Take the averaged gradients of the buckets reduced so far, in launch order (all of
        them with ``wait``), and step the units they complete. A parameter unused on this
        process is left to DDP, which gives it the average when another process used it."""
        while self._buckets:
            future, params, grads = self._buckets[0]
            if not wait and not future.done():
                return
            self._buckets.pop(0)
            future.wait()  # raises if the all-reduce failed; on CUDA, orders this stream after it
            for param, grad in zip(params, grads):
                key = id(param)
                if key in self._arrived and key in self._group_of:
                    param.grad = grad
                    self._reduced[key] = (param, grad)
                    self._mark_usable(key)
            self._flush()

    def flush(self) -> None:
        """Step now every unit whose gradients are complete (``BlockCheckpointing`` calls it before
        recomputing a block, so no finished gradient is held through the recomputation). The
        recomputation runs with grad mode and autocast on; the update runs with both off, as at a
        gradient hook."""
        if not self._pending and not self._buckets:
            return
        device = self._groups[0][1][0].device.type
        with torch.no_grad(), torch.autocast(device, enabled=False):
            self._take_buckets()
            self._flush()

    def _flush(self) -> None:
        while self._pending:
            self._step_group(self._pending.pop(0))

    def _step_group(self, index: int, at_step: bool = False) -> None:
        name, params = self._groups[index]
        if index in self._scored and self.scoring is not None:
            self.scoring.unit_ready(UnitView(name=name, weights=[p.detach() for p in params], grads=[p.grad for p in params]))
        stepped = [p for p in params if p.grad is not None and id(p) in self._in_optimizer]
        for param in stepped:  # for grad_norm(): one scalar per parameter, on its device
            self._norms[id(param)] = torch.linalg.vector_norm(param.grad, 2.0, dtype=torch.float32)
        if stepped:
            self.counts["step" if at_step else "backward"] += 1
            with scaled_lr(self.optimizer.param_groups, self._lr_scale):
                if self.paging is not None:
                    self.paging.step_params(stepped)
                else:
                    _update_alone(self.optimizer, stepped)
        for param in stepped:  # DDP's finalization copies each bucket into .grad: onto itself, not a new tensor
            if id(param) in self._reduced:
                param.grad = self._reduced[id(param)][1]
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


class _BucketBridge:
    """The state of SlimFit's DDP communication hook, one per DDP model (DDP takes one hook, for
    good): the process group and the backend stepping from the buckets, None once detached."""

    def __init__(self, ddp: torch.nn.parallel.DistributedDataParallel):
        self.group = ddp.process_group
        self.ddp = weakref.ref(ddp)
        self.backend: InBackwardStepBackend | None = None

    @classmethod
    def of(cls, ddp: torch.nn.parallel.DistributedDataParallel) -> "_BucketBridge":
        bridge = getattr(ddp, "_slimfit_bucket_bridge", None)
        if bridge is None:
            bridge = ddp._slimfit_bucket_bridge = cls(ddp)
            ddp.register_comm_hook(bridge, _reduce_bucket)
        return bridge


def _reduce_bucket(state, bucket):  # no annotations: DDP checks them against its own types
    """DDP's averaging exactly as it runs without a hook (each gradient times 1/world size, then
    an all-reduce sum), the bucket handed to the backend stepping in backward."""
    import torch.distributed as dist

    ddp = state.ddp()
    if state.backend is not None and ddp is not None and ddp._join_config.enable:
        raise IntegrationError(
            f"{_KEY}: DDP's join() averages over the processes not yet joined and shadows the others' "
            f"all-reduces, so the buckets the units are stepped from are not DDP's plain average; "
            f"train without join() (equal batches on every process), {_USE_DEFAULT}."
        )
    buffer = bucket.buffer()
    buffer.mul_(1.0 / state.group.size())
    future = dist.all_reduce(buffer, group=state.group, async_op=True).get_future()
    if state.backend is not None:
        state.backend.bucket_launched(future, bucket)
    return future.then(lambda done: done.value()[0])


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
