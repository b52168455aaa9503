"""Row units: a vocabulary-sized matrix trained a range of rows at a time (``units.row_chunks``).

An input embedding or LM head is often larger than a step's whole parameter budget (MiniLM's
word embeddings are half the model), so a scheduler that bounds each step's parameters could
never train it. ``units.row_chunks`` splits it into units of a few thousand rows
(``model.embed_tokens.weight[0:8192]``, ...), each scheduled and scored like any other unit. A
tied embedding is one parameter and so one set of row units, trained once a step.

How a row unit trains (``RowLayout``):

- the parameter has ``requires_grad`` when any of its row units trains, so backward computes its
  whole gradient (an ``nn.Embedding`` gives zeros for the rows the batch did not use);
- the optimizer step (the streamed step of ``paging.py``, which row units need) updates only the
  rows of the units trained this step, a slice of at most ``chunk_bytes`` of rows at a time: the
  slice of the weight (a view, or with ``master_weights: host`` its fp32 master rows), the slice
  of its gradient and the slices of its state are handed to the optimizer's own update as if
  they were a parameter of their own, and the new state is written back into those rows. For
  element-wise optimizers (SGD, Adam, AdamW: every state element depends only on the same
  element of the weight and gradient) that is exactly the dense update on those rows; others are
  refused at attach. Frozen rows, their state and their masters do not move.
- each row range keeps its own step count (Adam's bias correction), as it would were it a
  tensor of its own: the parameter's state holds the full-shaped tensors (``exp_avg``...), one
  scalar per range for the optimizer's scalars (``step``) and two markers, ``row_ranges`` (the
  layout, checked at every step) and ``row_stepped`` (which ranges have state yet: one that has
  none starts as the optimizer starts a new parameter). The optimizer's ``state_dict`` carries
  all of it, so checkpoints resume exactly. State saved by dense training is taken over exactly
  (every range then has its step count).

Memory: the device holds the state (and masters) of one slice of rows at a time, never the
matrix's. The gradient is the whole matrix's while the backward runs and until the step
releases it (``nn.Embedding`` and the LM head compute it dense): row units bound the optimizer
side of a vocabulary-sized matrix, not its gradient.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Callable, Sequence

import torch

from .errors import IntegrationError
from .hookspecs import UnitView
from .units import Unit

if TYPE_CHECKING:
    from .master_weights import Master, MasterWeights

#: Optimizers whose update is element-wise: a slice of rows stepped alone is the dense update on them.
ELEMENT_WISE = (torch.optim.SGD, torch.optim.Adam, torch.optim.AdamW)
#: State keys that mark a parameter's row layout: its ranges, and which ranges have state yet.
RANGES = "row_ranges"
STEPPED = "row_stepped"


class RowLayout:
    """The row units of a model's parameters, and which of their ranges train this step."""

    def __init__(self, units: Sequence[Unit]):
        by_param: dict[int, list[Unit]] = {}
        for unit in units:
            if unit.rows is not None:
                by_param.setdefault(id(unit.params[0]), []).append(unit)
        self._units = {key: sorted(found, key=lambda u: u.rows) for key, found in by_param.items()}
        self._ranges = {key: tuple(u.rows for u in found) for key, found in self._units.items()}
        self._params = {key: found[0].params[0] for key, found in self._units.items()}
        self._rows_of = {u.name: u.rows for found in self._units.values() for u in found}
        self.trained: dict[int, tuple[int, ...]] = {}  # id(param) -> indices of its ranges trained now

    @classmethod
    def of(cls, units: Sequence[Unit]) -> "RowLayout | None":
        """The layout of ``units``' row units; None when there are none."""
        layout = cls(units)
        return layout if layout._units else None

    def __contains__(self, param: torch.Tensor) -> bool:
        return id(param) in self._units

    def ranges(self, param: torch.Tensor) -> tuple[tuple[int, int], ...]:
        return self._ranges[id(param)]

    def select(self, trained: set[str]) -> None:
        """Record the units trained this step (names; row units among them say which rows)."""
        self.trained = {
            key: tuple(i for i, u in enumerate(found) if u.name in trained) for key, found in self._units.items()
        }

    def narrow(self, view: UnitView) -> UnitView:
        """A scorer's view of a row unit: its rows of the weight (and gradient), as views."""
        rows = self._rows_of.get(view.name)
        if rows is None:
            return view
        start, stop = rows
        return UnitView(
            name=view.name,
            weights=[w[start:stop] for w in view.weights],
            grads=[None if g is None else g[start:stop] for g in view.grads],
        )

    def check_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        """Refuse an optimizer whose update is not element-wise: a row slice stepped alone would differ."""
        if type(optimizer) not in ELEMENT_WISE:
            allowed = ", ".join(c.__name__ for c in ELEMENT_WISE)
            raise IntegrationError(
                f"units.row_chunks steps a split tensor a slice of rows at a time, which is exact only for "
                f"element-wise optimizers ({allowed}); got {type(optimizer).__name__}. Use one of those, or "
                f"remove units.row_chunks."
            )

    # ------------------------------------------------------------------ the step
    def step(
        self,
        optimizer: torch.optim.Optimizer,
        params: Sequence[torch.Tensor],
        update: Callable,
        args: tuple,
        kwargs: dict,
        chunk_bytes: int,
        masters: "MasterWeights | None",
        announce: Callable[[int], None],
        host_tensor: Callable[[tuple[int, ...], torch.dtype, torch.device], torch.Tensor],
    ) -> None:
        """Run ``update`` on the trained rows of each of ``params`` (row-unit parameters that have a
        gradient), a slice of at most ``chunk_bytes`` of rows at a time; release their gradients.

        ``announce`` is told the change in device-resident optimizer bytes; ``host_tensor(shape,
        dtype, device)`` makes a zeroed state tensor in host memory, paged out from ``device``
        (per-range scalars live on the CPU, as torch keeps a non-fused optimizer's step).
        """
        groups = optimizer.param_groups
        saved = [group["params"] for group in groups]
        group_of = {id(p): i for i, group_params in enumerate(saved) for p in group_params}
        try:
            for param in params:
                group = groups[group_of[id(param)]]
                state = self._layout_state(optimizer, param, host_tensor)
                master = masters.of(param) if masters is not None else None
                per_slice = rows_per_slice(param, chunk_bytes, master)
                for index in self.trained.get(id(param), ()):
                    start, stop = state[RANGES][index]
                    # Every slice of the range starts from the range's scalars (its step count) as
                    # they were before this step; the first slice stepped writes back the new ones.
                    scalars = _range_scalars(state, index) if state[STEPPED][index] else None
                    for first in range(start, stop, per_slice):
                        rows = (first, min(first + per_slice, stop))
                        for other in groups:
                            other["params"] = []
                        self._step_slice(optimizer, update, args, kwargs, group, param, state, index, rows, scalars,
                                         master, announce, host_tensor)
                    state[STEPPED] = tuple(done or i == index for i, done in enumerate(state[STEPPED]))
                param.grad = None
        finally:
            for group, group_params in zip(groups, saved):
                group["params"] = group_params

    def _layout_state(self, optimizer: torch.optim.Optimizer, param: torch.Tensor, host_tensor: Callable) -> dict:
        """``param``'s state in the row layout: made when it has none, taken over from dense
        training (every range at its step count), checked against the units otherwise."""
        ranges = self.ranges(param)
        state = optimizer.state[param]  # a defaultdict: {} when the parameter has no state yet
        if RANGES in state:
            if tuple(tuple(r) for r in state[RANGES]) != ranges:
                raise IntegrationError(
                    f"the optimizer state of a {tuple(param.shape)} parameter was made for row units "
                    f"{list(state[RANGES])[:3]}..., this run splits it as {list(ranges)[:3]}...: resume with the "
                    f"units.row_chunks the checkpoint was trained with."
                )
            return state
        taken = bool(state)
        for key, value in list(state.items()):
            if isinstance(value, torch.Tensor) and value.dim() == 0:
                state[key] = host_tensor((len(ranges),), value.dtype, torch.device("cpu"))
                state[key].copy_(value.detach().cpu().expand(len(ranges)))
            elif isinstance(value, torch.Tensor) and tuple(value.shape) != tuple(param.shape):
                raise IntegrationError(
                    f"{type(optimizer).__name__} state {key!r} of a {tuple(param.shape)} parameter has shape "
                    f"{tuple(value.shape)}: it is not element-wise, so units.row_chunks cannot step it by rows."
                )
        state[RANGES] = ranges
        state[STEPPED] = (taken,) * len(ranges)
        return state

    def _step_slice(self, optimizer, update, args, kwargs, group, param, state, index, rows, scalars, master, announce, host_tensor) -> None:
        """Step rows ``rows`` of range ``index`` as a parameter of their own (``scalars``: the
        range's per-range state before this step; None when the range has no state yet)."""
        stepped = step_rows(optimizer, update, args, kwargs, group, param, state, rows, scalars, master, announce,
                            host_tensor)
        for key, value in stepped.items():
            if key not in state:
                state[key] = host_tensor((len(state[RANGES]),), value.dtype, torch.device("cpu"))
            state[key][index] = value.to(state[key].device)

    def to_dense_state(self, optimizer: torch.optim.Optimizer) -> None:
        """The state of each row-unit parameter as a plain optimizer keeps it (when detaching):
        the markers dropped, each per-range scalar replaced by its largest value (the step count
        of the range trained most). Not exact for ranges trained fewer times: after ``detach`` the
        whole matrix is one parameter again, with one step count."""
        scalar_device = {
            id(p): p.device if group.get("fused") or group.get("capturable") else torch.device("cpu")
            for group in optimizer.param_groups for p in group["params"]
        }
        for param in self._params.values():
            state = optimizer.state.get(param)
            if not state or RANGES not in state:
                continue
            for name, value in list(state.items()):
                if isinstance(value, torch.Tensor) and value.dim() == 1:
                    state[name] = value.max().to(scalar_device[id(param)], copy=True)
            del state[RANGES], state[STEPPED]


def rows_per_slice(param: torch.Tensor, chunk_bytes: int, master: "Master | None") -> int:
    """How many rows of ``param`` one slice holds: at most ``chunk_bytes`` of them (of the fp32
    master rows with ``master``), and at least one row."""
    row_bytes = math.prod(param.shape[1:]) * (4 if master is not None else param.element_size())
    return max(1, chunk_bytes // max(row_bytes, 1))


def step_rows(
    optimizer: torch.optim.Optimizer,
    update: Callable,
    args: tuple,
    kwargs: dict,
    group: dict,
    param: torch.Tensor,
    state: dict,
    rows: tuple[int, int],
    scalars: dict | None,
    master: "Master | None",
    announce: Callable[[int], None],
    host_tensor: Callable[[tuple[int, ...], torch.dtype, torch.device], torch.Tensor],
) -> dict:
    """Run ``update`` on rows ``rows`` of ``param`` as if they were a parameter of their own: the
    rows of the weight (a view; with ``master`` its fp32 master rows, rounded back into the weight
    after), of its gradient and of its full-shaped state (``state``, in host memory) are copied in,
    stepped and the new state rows written back into ``state`` (made in host memory by
    ``host_tensor`` when missing). ``scalars``: the 0-dim state (``step``...) the rows start from,
    the same for every slice of one step; None when they have no state yet. Returns the stepped
    0-dim state, for the caller to keep once every slice is stepped (a slice that wrote back its
    bumped step count would give the next slice the wrong one). Exact for ``ELEMENT_WISE``
    optimizers. ``group`` must be ``param``'s group, the others emptied by the caller."""
    start, stop = rows
    grad = param.grad[start:stop]
    if master is not None:  # the fp32 master rows, stepped in the weight's place
        target = master.host[start:stop].to(param.device, copy=True)
        target.grad = grad.to(torch.float32)
    else:
        target = param.detach()[start:stop]  # a view: the update writes the weight's rows
        target.grad = grad
    scalar_device = param.device if group.get("fused") or group.get("capturable") else torch.device("cpu")
    slice_state: dict[Any, Any] = {}
    if scalars is not None:
        for key, value in state.items():
            if key in (RANGES, STEPPED):
                continue
            if key in scalars:
                slice_state[key] = scalars[key].to(scalar_device, copy=True)
            elif isinstance(value, torch.Tensor) and tuple(value.shape) == tuple(param.shape):
                slice_state[key] = value[start:stop].to(param.device, copy=True)
            elif isinstance(value, torch.Tensor):
                raise IntegrationError(
                    f"{type(optimizer).__name__} state {key!r} of a {tuple(param.shape)} parameter has shape "
                    f"{tuple(value.shape)}: it is not element-wise, so it cannot be stepped by rows."
                )
            else:
                slice_state[key] = value
    state_bytes = _tensor_bytes(slice_state)  # the update fills this very dict: counted before it runs
    resident = state_bytes + (_tensor_bytes([target, target.grad]) if master is not None else 0)
    announce(resident)
    optimizer.state[target] = slice_state
    group["params"] = [target]
    try:
        update(optimizer, *args, **kwargs)
        stepped = optimizer.state[target]
    finally:
        optimizer.state.pop(target, None)
        target.grad = None
    created = _tensor_bytes(stepped) - state_bytes
    announce(created)
    new_scalars: dict[Any, torch.Tensor] = {}
    for key, value in stepped.items():
        if isinstance(value, torch.Tensor) and value.dim() > 0 and tuple(value.shape) == tuple(target.shape):
            if key not in state:
                state[key] = host_tensor(tuple(param.shape), value.dtype, param.device)
            state[key][start:stop].copy_(value)
        elif isinstance(value, torch.Tensor) and value.dim() == 0:
            new_scalars[key] = value
        elif value is None or not isinstance(value, torch.Tensor):
            state[key] = value
        else:
            raise IntegrationError(
                f"{type(optimizer).__name__} made state {key!r} of shape {tuple(value.shape)} for rows "
                f"{start}:{stop}: not element-wise, so it cannot be stepped by rows."
            )
    if master is not None:
        param.detach()[start:stop].copy_(target)  # rounded into the weight's own bf16 rows
        master.host[start:stop].copy_(target)
    announce(-(resident + created))
    return new_scalars


def step_whole_by_rows(
    optimizer: torch.optim.Optimizer,
    param: torch.Tensor,
    update: Callable,
    args: tuple,
    kwargs: dict,
    chunk_bytes: int,
    master: "Master | None",
    announce: Callable[[int], None],
    host_tensor: Callable[[tuple[int, ...], torch.dtype, torch.device], torch.Tensor],
) -> int:
    """Step all of ``param`` (its state in host memory) a slice of at most ``chunk_bytes`` of rows
    at a time, so the device holds one slice's state (and master rows, and fp32 gradient) and
    never the whole tensor's; bit-identical to stepping it whole for ``ELEMENT_WISE`` optimizers.
    Its 0-dim state (the step count) is taken once, given to every slice and kept after the last.
    Releases its gradient; returns the number of slices stepped."""
    groups = optimizer.param_groups
    saved = [group["params"] for group in groups]
    group = next(g for g in groups if any(p is param for p in g["params"]))
    state = optimizer.state[param]  # a defaultdict: {} when the parameter has no state yet
    scalars = {k: v.clone() for k, v in state.items() if isinstance(v, torch.Tensor) and v.dim() == 0} if state else None
    per_slice = rows_per_slice(param, chunk_bytes, master)
    new_scalars: dict = {}
    slices = 0
    try:
        for first in range(0, param.shape[0], per_slice):
            for other in groups:
                other["params"] = []
            new_scalars = step_rows(optimizer, update, args, kwargs, group, param, state,
                                    (first, min(first + per_slice, param.shape[0])), scalars, master, announce,
                                    host_tensor)
            slices += 1
    finally:
        for other, group_params in zip(groups, saved):
            other["params"] = group_params
    for key, value in new_scalars.items():  # every slice stepped: the new step count, once
        old = state.get(key)
        if isinstance(old, torch.Tensor) and old.shape == value.shape and old.dtype == value.dtype:
            old.copy_(value)  # where the step count is kept
        elif value.device == param.device:  # on the device (fused, or a CPU model): in host memory as paged
            state[key] = host_tensor(tuple(value.shape), value.dtype, param.device)
            state[key].copy_(value)
        else:
            state[key] = value  # on the CPU, as torch keeps it for a device model
    param.grad = None
    return slices


def _range_scalars(state: dict, index: int) -> dict:
    """The per-range scalars (``step``...) of range ``index``, copied."""
    return {
        key: value[index].clone()
        for key, value in state.items()
        if isinstance(value, torch.Tensor) and value.dim() == 1
    }


def _tensor_bytes(obj: Any) -> int:
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(_tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_tensor_bytes(v) for v in obj)
    return 0
