"""Freeze-true optimizer stepping under DeepSpeed ZeRO stages 1-3, with or without CPU offload.

ZeRO hands its *basic* optimizer (torch Adam/AdamW/SGD, FusedAdam, DeepSpeedCPUAdam) one flat fp32
partition per parameter group. A parameter frozen after ``deepspeed.initialize`` (``requires_grad``
turned off) is still part of that flat tensor, so it is stepped with a zero gradient (under
offload: a stale one), and Adam momentum and decoupled weight decay move it.

``ZeroStepBackend`` wraps the basic optimizer's ``step``. For the length of one call it replaces
each group's flat tensor by 1-D views of the *trainable* parameters' slices of it, with gradient
views into the flat gradient and optimizer-state entries that are views into the flat tensor's
state, plus a step count per parameter kept here. The real optimizer then updates exactly those
slices, and Adam's bias correction counts the steps each parameter was really trained, as a
per-tensor torch optimizer would. Frozen slices (fp32 master, module copy, moments) are never
written, and nothing is allocated per frozen element.

Checkpoints: ``engine.save_checkpoint`` records every parameter whose ``requires_grad`` is off as
a "frozen parameter", and ``engine.load_checkpoint`` expects each parameter frozen at load time
among those saved (else ``KeyError`` in ``load_module_state_dict``). A per-step freeze decision
is no property of the model, so the backend also wraps both calls: for their length every
parameter ZeRO's optimizer holds is trainable, and the checkpoint records the model's real
trainable set (parameters frozen before ``deepspeed.initialize`` stay frozen).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Collection, Sequence

import torch

from ..errors import IntegrationError
from ..hookspecs import UnitView
from ..stepping import StepCallback, UnitParams, scaled_lr


# ZeRO-3's per-parameter gradient partitions (name-mangled private attribute).
_Z3_GRAD_PARTITIONS = "_DeepSpeedZeroOptimizer_Stage3__param_id_to_grad_partition"


@dataclass(frozen=True, eq=False)
class _Slice:
    """Where this rank holds one parameter: ``flat[start:start + numel]`` is its elements
    ``[param_start, param_start + numel)`` (``numel`` is 0 on a rank that holds none)."""

    key: int  # id() of the module parameter
    name: str
    flat: torch.Tensor
    start: int
    numel: int
    param_start: int


class ZeroStepBackend:
    """Freeze-true stepping for a ``deepspeed.DeepSpeedEngine`` running ZeRO stage 1, 2 or 3.

    Example (under Accelerate, ``engine = accelerator.deepspeed_engine_wrapped.engine``)::

        backend = ZeroStepBackend(engine)
        backend.install(before_step=lambda: ..., after_step=lambda: ...)
        for p in frozen: p.requires_grad_(False)
        backend.set_frozen(frozen)
        engine.backward(engine(batch).loss); engine.step()

    ``before_step`` runs right before the basic optimizer's first update of a real step (steps
    DeepSpeed skips on fp16 overflow never reach it), ``after_step`` once the whole ZeRO step is
    done. ZeRO unscales and clips each group's gradient (ZeRO-3: each sub-group's, several per
    group under a small ``sub_group_size``) just before stepping it, and without offload builds
    its flat fp32 gradient only then, so at ``before_step`` the later groups' gradients are still
    loss-scaled and unclipped: ``views`` gives them divided by the factor DeepSpeed applies to
    every group of the step (as fp32 copies), so scorers see what DeepSpeed steps.
    """

    def __init__(self, engine: Any):
        from .deepspeed_versions import check_deepspeed_version

        check_deepspeed_version()  # the internals below change between DeepSpeed releases
        from deepspeed.ops.adam import DeepSpeedCPUAdam, FusedAdam
        from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3
        from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

        zero = getattr(engine, "optimizer", None)
        if isinstance(zero, DeepSpeedZeroOptimizer_Stage3):
            self._stage3 = True
        elif isinstance(zero, DeepSpeedZeroOptimizer):
            self._stage3 = False
        else:
            raise IntegrationError(
                f"ZeroStepBackend needs a DeepSpeed engine running ZeRO stage 1, 2 or 3; this one "
                f"(stage {engine.zero_optimization_stage()}) has optimizer {type(zero).__name__}. "
                "At stage 0 with a plain torch optimizer use TorchStepBackend(engine.optimizer); "
                "DeepSpeed's fp16/bf16 optimizer wrappers are not supported."
            )
        if getattr(zero, "zenflow", False) or getattr(zero, "use_muon", False):
            raise IntegrationError("ZeroStepBackend does not support DeepSpeed ZenFlow or Muon.")
        if getattr(zero, "swap_optimizer", False):
            raise IntegrationError("ZeroStepBackend does not support optimizer offload to NVMe; use 'cpu'.")
        if self._stage3 and getattr(zero, "offload_optimizer", False) and zero.partial_offload != 1.0:
            raise IntegrationError("ZeroStepBackend does not support partial optimizer offload (ratio < 1).")

        basic = zero.optimizer
        kind = type(basic)
        # How the optimizer keeps a tensor's step count (torch: 0-d tensor, DeepSpeed: int).
        if kind in (torch.optim.Adam, torch.optim.AdamW):
            self._step_format = "tensor"
        elif kind in (DeepSpeedCPUAdam, FusedAdam):
            self._step_format = "int"
        elif kind is torch.optim.SGD:
            self._step_format = None
        else:
            raise IntegrationError(
                f"ZeroStepBackend supports torch.optim.Adam/AdamW/SGD, DeepSpeed FusedAdam and "
                f"DeepSpeedCPUAdam as ZeRO's basic optimizer, not {kind.__module__}.{kind.__name__}."
            )
        # FusedAdam applies one step count to every tensor of a call: call it once per count.
        self._one_count_per_call = kind is FusedAdam
        self._cpu_adam = kind is DeepSpeedCPUAdam

        self.engine = engine
        self.zero_optimizer = zero
        self.optimizer = basic
        self._names = {id(p): name for name, p in engine.module.named_parameters()}
        # Parameters frozen before deepspeed.initialize are not in ZeRO's groups and never move.
        groups = zero.fp16_groups if self._stage3 else zero.bit16_groups
        self._managed = [id(p) for group in groups for p in group if id(p) in self._names]
        self._managed_params = [p for group in groups for p in group if id(p) in self._names]
        self._steps: dict[str, int] = {self._names[key]: 0 for key in self._managed}
        self._groups_at_init = list(basic.param_groups)  # ZeRO-1/2 swaps the list during a step
        self._flat_group_list: list[tuple[torch.Tensor, dict]] | None = None
        self._slices: dict[int, _Slice] | None = None
        self._by_flat: dict[int, list[_Slice]] = {}
        self._frozen: set[int] = set()
        self._callbacks: tuple[StepCallback, StepCallback] | None = None
        self._installed: list[tuple[Any, str, Any, Any]] = []  # (owner, attribute, previous, wrapper)
        self._active = False
        self._in_zero_step = False
        self._began = False
        self._lr_scale = 1.0
        # This step's 1/(loss scale x clip factor), and the gradients so divided (ZeRO-1/2: ids
        # of the flat gradients; ZeRO-3: ids of the sub-groups' fp32 partitions).
        self._unscale_factor: torch.Tensor | None = None
        self._unscaled: set[int] = set()

    # ---------------------------------------------------------------------------- protocol
    @property
    def param_groups(self) -> list[dict]:
        # ZeRO-1/2 narrows basic.param_groups to one group while stepping it: use the full list.
        return self._groups_at_init

    def install(self, before_step: StepCallback, after_step: StepCallback, lr_scale: float = 1.0) -> None:
        if self._installed:
            raise IntegrationError("ZeroStepBackend.install was called twice; call remove() first.")
        self._callbacks = (before_step, after_step)
        self._lr_scale = lr_scale
        self._active = True
        wrapped = (
            (self.zero_optimizer, "step", self._zero_step),
            (self.optimizer, "step", self._basic_step),
            (self.engine, "save_checkpoint", self._save_checkpoint),
            (self.engine, "load_checkpoint", self._load_checkpoint),
        )
        unscale = self._unscale_and_clip_sub_group if self._stage3 else self._unscale_and_clip
        wrapped += ((self.zero_optimizer, "unscale_and_clip_grads", unscale),)
        for owner, attribute, hook in wrapped:
            original = getattr(owner, attribute)

            def wrapper(*args, _original=original, _hook=hook, **kwargs):
                if not self._active:  # removed, but someone wrapped us meanwhile
                    return _original(*args, **kwargs)
                return _hook(_original, *args, **kwargs)

            # An instance attribute shadows the class method; DeepSpeed calls `optimizer.step()`,
            # Accelerate `engine.save_checkpoint(...)`.
            self._installed.append((owner, attribute, vars(owner).get(attribute), wrapper))
            object.__setattr__(owner, attribute, wrapper)

    def set_frozen(self, frozen: Collection[torch.nn.Parameter]) -> None:
        ids = set()
        for param in frozen:
            if id(param) not in self._names:
                raise IntegrationError("set_frozen got a parameter that is not in the engine's model.")
            ids.add(id(param))
        if self._stage3:
            # ZeRO-3 keeps a persistent gradient partition per parameter; nothing writes a frozen
            # one, so its last gradient would stay there and reach the fp16 overflow check.
            partitions = getattr(self.zero_optimizer, _Z3_GRAD_PARTITIONS, {})
            for param in frozen:
                if id(param) not in self._frozen and param.ds_id in partitions:
                    partitions[param.ds_id].zero_()
        self._frozen = ids

    def views(self, units: Sequence[UnitParams]) -> list[UnitView]:
        slices = self._table()
        out = []
        for name, params in units:
            weights, grads = [], []
            for param in params:
                piece = slices.get(id(param))
                if piece is None:
                    raise IntegrationError(
                        f"unit '{name}' has a parameter that ZeRO's optimizer does not hold (was it frozen "
                        "before deepspeed.initialize?). Build the engine with every parameter trainable."
                    )
                weights.append(piece.flat.detach().narrow(0, piece.start, piece.numel))
                grads.append(self._grad(piece, param))
            out.append(UnitView(name=name, weights=weights, grads=grads))
        return out

    def remove(self) -> None:
        for owner, attribute, previous, wrapper in self._installed:
            if vars(owner).get(attribute) is wrapper:
                if previous is None:
                    delattr(owner, attribute)
                else:
                    object.__setattr__(owner, attribute, previous)
        self._installed = []
        self._active = False
        self._callbacks = None

    def state_dict(self) -> dict:
        return {"param_steps": dict(self._steps)}

    def load_state_dict(self, state: dict) -> None:
        steps = state.get("param_steps", {})
        unknown = sorted(set(steps) - set(self._steps))
        if unknown:
            raise IntegrationError(f"ZeroStepBackend state names parameters this model lacks: {unknown[:5]}")
        self._steps.update({name: int(count) for name, count in steps.items()})

    # ---------------------------------------------------------------------------- checkpoints
    def _save_checkpoint(self, original, *args, **kwargs):
        with self._all_trainable():
            return original(*args, **kwargs)

    def _load_checkpoint(self, original, *args, **kwargs):
        with self._all_trainable():
            result = original(*args, **kwargs)
        # Loading may rebuild the basic optimizer's param groups and state: look them up again.
        self._groups_at_init = list(self.optimizer.param_groups)
        self._flat_group_list, self._slices, self._by_flat = None, None, {}
        return result

    @contextmanager
    def _all_trainable(self):
        """Every parameter ZeRO's optimizer holds trainable for the block, then as it was."""
        frozen_now = [p for p in self._managed_params if not p.requires_grad]
        for param in frozen_now:
            param.requires_grad_(True)
        try:
            yield
        finally:
            for param in frozen_now:
                param.requires_grad_(False)

    # ---------------------------------------------------------------------------- stepping
    def _zero_step(self, original, *args, **kwargs):
        self._in_zero_step, self._began = True, False
        self._unscale_factor, self._unscaled = None, set()
        try:
            result = original(*args, **kwargs)
        finally:
            self._in_zero_step = False
            self._unscale_factor, self._unscaled = None, set()
        if self._began:  # not skipped (fp16 overflow)
            self._finish()
        return result

    def _unscale_and_clip(self, original, grad_groups_flat, total_norm, *args, **kwargs):
        """DeepSpeed's per-group unscale-and-clip; also learns the factor it applies (the same for
        every group of a step) by running it on a probe, and notes which gradients it divided."""
        result = original(grad_groups_flat, total_norm, *args, **kwargs)
        flat = [g for item in grad_groups_flat for g in (item if isinstance(item, list) else [item])]
        if self._unscale_factor is None and flat:
            probe = torch.ones(1, dtype=torch.float32, device=flat[0].device)
            original([probe], total_norm, *args, **kwargs)
            self._unscale_factor = probe
        self._unscaled.update(id(g) for g in flat)
        return result

    def _unscale_and_clip_sub_group(self, original, sub_group_id, total_norm, *args, **kwargs):
        """ZeRO-3's unscale-and-clip of one sub-group's fp32 gradient; also learns the factor it
        applies (the same for every sub-group of a step) by running it once more with a probe in
        that sub-group's place, and notes which sub-groups it divided."""
        result = original(sub_group_id, total_norm, *args, **kwargs)
        zero = self.zero_optimizer
        flats = zero.fp32_partitioned_groups_flat
        if self._unscale_factor is None:
            grad = flats[sub_group_id].grad
            stand_in = torch.zeros(1, dtype=grad.dtype, device=grad.device)
            stand_in.grad = torch.ones_like(stand_in)
            # The method reads the gradient it divides from this list, by sub-group id.
            zero.fp32_partitioned_groups_flat = [stand_in if i == sub_group_id else f for i, f in enumerate(flats)]
            try:
                original(sub_group_id, total_norm, *args, **kwargs)
            finally:
                zero.fp32_partitioned_groups_flat = flats
            self._unscale_factor = stand_in.grad
        self._unscaled.add(id(flats[sub_group_id]))
        return result

    def _as_unscaled(self, grad: torch.Tensor) -> torch.Tensor:
        """A gradient DeepSpeed has not unscaled and clipped yet, as it will be (an fp32 copy)."""
        if self._unscale_factor is None:
            return grad
        return grad.float() * self._unscale_factor.to(grad.device)

    def _finish(self) -> None:
        for key in self._managed:
            if key not in self._frozen:
                self._steps[self._names[key]] += 1
        self._callbacks[1]()

    @torch.no_grad()
    def _basic_step(self, original, *args, **kwargs):
        if not self._began:
            self._began = True
            self._callbacks[0]()
        for flat, group in self._flat_groups():
            # Every flat tensor's state must exist after the first call: ZeRO-1/2 links all
            # groups' state to its parameters right after stepping the first group.
            self._flat_state(group, flat)
        groups = self.optimizer.param_groups
        saved = [group["params"] for group in groups]
        per_group: list[list[tuple[torch.Tensor, _Slice]]] = []
        result = None
        try:
            for group in groups:
                views = []
                for flat in group["params"]:
                    pieces = self._table_by_flat().get(id(flat))
                    if pieces is None:
                        raise IntegrationError("ZeRO's optimizer holds a tensor that is no ZeRO partition.")
                    state = self._flat_state(group, flat)
                    trained = [p for p in pieces if p.numel and p.key not in self._frozen]
                    views += [(self._view(p, state), p) for p in trained]
                    self._count_flat_step(state)
                per_group.append(views)
            if self._one_count_per_call:
                counts = sorted({self._steps[p.name] for views in per_group for _, p in views}) or [0]
            else:
                counts = [None]
            for count in counts:
                for group, views in zip(groups, per_group):
                    group["params"] = [v for v, p in views if count is None or self._steps[p.name] == count]
                if self._cpu_adam:
                    self._restart_cpu_adam_powers()
                # ZeRO-1/2 hands the basic optimizer one group at a time: scale what it steps now.
                with scaled_lr(self.optimizer.param_groups, self._lr_scale):
                    result = original(*args, **kwargs)
        finally:
            for group, params in zip(groups, saved):
                group["params"] = params
            for views in per_group:
                for view, piece in views:
                    self._write_back(view, piece)
        if not self._in_zero_step:  # called outside engine.step(): it is a step of its own
            self._finish()
        return result

    def _restart_cpu_adam_powers(self) -> None:
        """DeepSpeedCPUAdam's C++ side keeps beta**t for bias correction as a running product,
        advanced when a call's step follows the previous call's and recomputed with ``pow``
        otherwise; no checkpoint stores it, so a resumed run would round differently. An empty
        update at step 0 first makes every step start from ``pow``, the same before and after a
        restart (and per-parameter step counts make the product path rare anyway)."""
        group = self.optimizer.param_groups[0]
        beta1, beta2 = group["betas"]
        empty = torch.empty(0, dtype=torch.float32)
        self.optimizer.ds_opt_adam.adam_update(
            self.optimizer.opt_id, 0, group["lr"], beta1, beta2, group["eps"], group["weight_decay"],
            group["bias_correction"], empty, empty, empty, empty,
        )

    def _view(self, piece: _Slice, flat_state: dict) -> torch.Tensor:
        """A 1-D view of the piece with its gradient and optimizer state viewed in place."""
        view = piece.flat.detach().narrow(0, piece.start, piece.numel)
        view.grad = piece.flat.grad.detach().narrow(0, piece.start, piece.numel)
        count = self._steps[piece.name]
        state = {
            key: value.narrow(0, piece.start, piece.numel)
            for key, value in flat_state.items()
            if torch.is_tensor(value) and value.dim() == 1 and value.numel() == piece.flat.numel()
        }
        if self._step_format == "tensor":
            step = flat_state["step"]
            state["step"] = torch.tensor(float(count), dtype=step.dtype, device=step.device)
        elif self._step_format == "int":
            state["step"] = count
        elif count == 0:
            state = {}  # SGD starts a parameter's momentum from its first gradient
        if state:
            self.optimizer.state[view] = state
        return view

    def _write_back(self, view: torch.Tensor, piece: _Slice) -> None:
        """Keep what the optimizer created for the view (SGD's first momentum) in the flat state."""
        view.grad = None
        state = self.optimizer.state.pop(view, {})
        flat_state = self.optimizer.state[piece.flat]
        for key, value in state.items():
            if torch.is_tensor(value) and value.dim() == 1 and value.numel() == piece.numel and key != "step":
                if key not in flat_state:
                    flat_state[key] = torch.zeros_like(piece.flat, dtype=value.dtype)
                target = flat_state[key].narrow(0, piece.start, piece.numel)
                if target.data_ptr() != value.data_ptr():
                    target.copy_(value)

    def _flat_state(self, group: dict, flat: torch.Tensor) -> dict:
        """The flat tensor's optimizer state, created as the optimizer itself would on first use
        (DeepSpeed links and checkpoints it; the flat tensor is never stepped as a whole)."""
        state = self.optimizer.state[flat]
        if state:
            return state
        if self._step_format is None:
            if group.get("momentum", 0):
                state["momentum_buffer"] = torch.zeros_like(flat)
            return state
        if self._step_format == "tensor":
            on_device = group.get("capturable") or group.get("fused")
            state["step"] = torch.tensor(0.0, dtype=torch.float32, device=flat.device if on_device else "cpu")
        else:
            state["step"] = 0
        dtype = torch.float32 if getattr(self.optimizer, "fp32_optimizer_states", False) else flat.dtype
        state["exp_avg"] = torch.zeros_like(flat, dtype=dtype)
        state["exp_avg_sq"] = torch.zeros_like(flat, dtype=dtype)
        if group.get("amsgrad"):
            state["max_exp_avg_sq"] = torch.zeros_like(flat, dtype=dtype)
        return state

    def _count_flat_step(self, state: dict) -> None:
        # The flat tensor's own count keeps DeepSpeed's meaning (real steps) for checkpoints.
        if "step" in state:
            if torch.is_tensor(state["step"]):
                state["step"] += 1
            else:
                state["step"] = state["step"] + 1

    # ---------------------------------------------------------------------------- bookkeeping
    def _grad(self, piece: _Slice, param: torch.nn.Parameter) -> torch.Tensor | None:
        grad = piece.flat.grad
        if grad is not None:
            view = grad.detach().narrow(0, piece.start, piece.numel)
            # With offload every group's flat gradient exists, but only those stepped are unscaled.
            unscaled = id(piece.flat if self._stage3 else grad) in self._unscaled
            return view if unscaled else self._as_unscaled(view)
        if piece.numel == 0:
            return piece.flat.detach().narrow(0, piece.start, 0)
        # Without offload, a group's flat gradient exists only while DeepSpeed steps that group;
        # before that the gradient waits, loss-scaled and unclipped, in DeepSpeed's per-parameter
        # partition (ZeRO-3 divides a copy of it, so the partition stays scaled all step).
        try:
            if self._stage3:
                grad = self.zero_optimizer.get_local_fp32_grad_for_param(param)
            else:
                grad = param._hp_mapping.get_lp_grad_fragment(param._index_in_param_group)
        except (AttributeError, KeyError, ValueError, TypeError):
            return None
        if grad is None:
            return None
        return self._as_unscaled(grad.detach().reshape(-1).narrow(0, 0, piece.numel))

    def _table(self) -> dict[int, _Slice]:
        """id(module parameter) -> its slice of this rank's fp32 master partition (built once)."""
        if self._slices is not None:
            return self._slices
        zero = self.zero_optimizer
        slices: dict[int, _Slice] = {}
        if self._stage3:
            import deepspeed.comm as dist

            for flat, params in zip(zero.fp32_partitioned_groups_flat, zero.fp16_groups):
                offset = 0
                for param in params:
                    size = param.partition_numel()
                    if hasattr(zero, "_get_param_partition_rank"):
                        rank = zero._get_param_partition_rank(param)
                    else:
                        rank = dist.get_rank(group=zero.dp_process_group)
                    held = max(0, min(size, param.ds_numel - rank * size))  # the rest is padding
                    name = self._names[id(param)]
                    slices[id(param)] = _Slice(id(param), name, flat, offset, held, rank * size)
                    offset += size
        else:
            for flat, params in zip(zero.single_partition_of_fp32_groups, zero.bit16_groups):
                for param in params:
                    # DeepSpeed's own map from a parameter to its fragment of this rank's partition.
                    mapping, name = getattr(param, "_hp_mapping", None), self._names[id(param)]
                    if mapping is None:
                        slices[id(param)] = _Slice(id(param), name, flat, 0, 0, 0)
                    else:
                        hp, lp = mapping.hp_fragment_address, mapping.lp_fragment_address
                        slices[id(param)] = _Slice(id(param), name, flat, hp.start, hp.numel, lp.start)
        self._slices = slices
        for piece in slices.values():
            self._by_flat.setdefault(id(piece.flat), []).append(piece)
        return slices

    def _flat_groups(self) -> list[tuple[torch.Tensor, dict]]:
        """Each flat fp32 partition with the basic optimizer's param group that steps it."""
        if self._flat_group_list is None:
            zero, groups = self.zero_optimizer, self._groups_at_init
            if self._stage3:
                flats = zero.fp32_partitioned_groups_flat
                group_of = zero.sub_group_to_group_id
                self._flat_group_list = [(f, groups[group_of[i]]) for i, f in enumerate(flats)]
            else:
                self._flat_group_list = list(zip(zero.single_partition_of_fp32_groups, groups))
        return self._flat_group_list

    def _table_by_flat(self) -> dict[int, list[_Slice]]:
        self._table()
        return self._by_flat
