"""Optimizer state only where training happens: on the device only while its chunk is stepped.

A torch optimizer reads and writes a parameter's state (Adam moments, momentum buffers) only
inside ``optimizer.step()``, and only for parameters that have a gradient. ``OptimizerPaging``
keeps every parameter's state in host memory (pinned on CUDA) and streams it through the
device during the step:

- between steps nothing is resident: forward and backward run with no optimizer state on the
  device (``evict()`` pages out whatever appeared there, e.g. state loaded by ``load_state``);
- in the step (``stream_step``, called from the optimizer's step pre-hook) the parameters that
  have a gradient are updated chunk by chunk, smallest first (small parameters grouped up to
  ``chunk_bytes``, a large one alone): the chunk's state is copied in, the optimizer's own
  update runs on that chunk only, the state is copied back out and the chunk's gradients are
  released, as ``zero_grad(set_to_none=True)`` would release them right after the step. The
  largest gradients are stepped last, when fewest gradients are still alive. On CUDA the next
  chunk's state is copied in on a side stream while the current one is updated.

A parameter larger than ``chunk_bytes`` is stepped last, a slice of at most ``chunk_bytes`` of
rows at a time (``row_units.step_whole_by_rows``): the slice's rows of the weight (or of its fp32
master), of its gradient and of its state are stepped as a parameter of their own and the new
state written back into the host copies; the step count is taken once for every slice and kept
after the last. Exact for element-wise optimizers (SGD, Adam, AdamW: ``row_units.ELEMENT_WISE``);
others step such a parameter whole. Slices are copied synchronously and never prefetched, so a
CUDA prefetch is always of a chunk of at most ``chunk_bytes``.

So during a step the device holds the gradients not yet stepped plus one chunk's state (two on
CUDA, with the prefetch), instead of the state of everything trained. Copies are exact and each
parameter's update is the optimizer's own arithmetic on that parameter, so training is
bit-identical to keeping the state resident. On CPU the same steps run (the copies are real);
the memory meter then reports what would be device-resident (``optimizer``, told of every move
through ``listeners``) apart from what is paged (``optimizer_paged``): paged state tensors are
tagged (``is_paged``).

Requirements: the optimizer updates each parameter from its own gradient and state, which
holds for every ``torch.optim`` optimizer but LBFGS. A step given a closure (which computes the
gradients inside the step) is not streamed: the state of every parameter is brought in for it
and paged out after. After a streamed step the trained parameters' ``.grad`` is None.

With ``masters`` (``master_weights: host``, ``master_weights.py``) the fp32 master weights of a
bf16 model live on host too and are streamed with the state: a chunk's masters are copied in
with its state, stepped in the parameters' place (the optimizer's own update, on the fp32 cast
of the bf16 gradients), rounded into the parameters' bf16 storage and copied back out. The
meter counts a chunk's masters and fp32 gradients as device-resident optimizer bytes while
they are on the device. The optimizer's ``state_dict`` then carries the masters and its
``load_state_dict`` restores them, keeping the state fp32 and in host memory.

Applies to ``torch.optim`` optimizers, one device or DDP (each rank pages its own state).
Under DeepSpeed ZeRO the state lives in flat partitions that cannot be split by parameter:
there ``optimizer_paging`` is a no-op (SlimFit warns once at attach, nothing is copied, so
nothing is duplicated); DeepSpeed's ``offload_optimizer`` keeps that state on host instead.

Example (on its own; SlimFit's ``optimizer_paging: true`` does this for you)::

    paging = OptimizerPaging(optimizer).install()   # optimizer.step() now streams the state
    ...
    paging.remove()                                 # every state tensor back on the device
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Iterable

import torch
from torch.utils.weak import WeakIdKeyDictionary

from .config import DEFAULT_PAGING_CHUNK_MIB
from .errors import IntegrationError

if TYPE_CHECKING:
    from .master_weights import MasterWeights
    from .row_units import RowLayout

_PAGED: WeakIdKeyDictionary = WeakIdKeyDictionary()

#: Small parameters are stepped together up to this many bytes of parameters (fewer launches).
DEFAULT_CHUNK_BYTES = int(DEFAULT_PAGING_CHUNK_MIB * 2**20)


def is_paged(tensor: torch.Tensor) -> bool:
    """Whether ``tensor`` is optimizer state paged out to host memory by ``OptimizerPaging``."""
    return tensor in _PAGED


def _nbytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


class OptimizerPaging:
    """Keeps an optimizer's state in host memory and streams it through the step; see the
    module docstring.

    ``pin``: pin host copies (default: when the parameters are on CUDA), so copies can be
    asynchronous. ``chunk_bytes``: parameters stepped together, in bytes of parameters.
    ``listeners`` are called with the change in device-resident state bytes after every move
    (the memory meter follows the state this way). ``masters``: fp32 master weights of a bf16
    model, streamed with the state (see the module docstring). ``rows``: the row units of split
    matrices (``row_units.py``): only their trained rows are stepped, a slice at a time.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        pin: bool | None = None,
        chunk_bytes: int = DEFAULT_CHUNK_BYTES,
        masters: "MasterWeights | None" = None,
        rows: "RowLayout | None" = None,
    ):
        self.optimizer = optimizer
        self.pin = pin
        self.chunk_bytes = chunk_bytes
        self.masters = masters
        self.rows = rows
        self._resident_masters: dict[int, torch.Tensor] = {}  # id(param) -> its master on the device
        self._standing_in: list[tuple[torch.Tensor, torch.Tensor]] = []  # (param, master stepped for it)
        self._loading: tuple | None = None
        self.listeners: list[Callable[[int], None]] = []
        self._stream = None
        self.paged_out = 0  # tensors copied out so far (for tests and reports)
        self.paged_in = 0
        self.chunks_stepped = 0
        self.slices_stepped = 0  # row slices of parameters larger than a chunk
        self._handles: list = []

    # ---------------------------------------------------------------- the calls
    def install(self, step_hooks: bool = True) -> "OptimizerPaging":
        """Stream every ``optimizer.step()`` from now on (step pre- and post-hooks); with
        masters, also carry them in the optimizer's ``state_dict`` and ``load_state_dict``.
        ``step_hooks=False``: the caller's own step hooks call ``stream_step`` and ``evict``
        (``TorchStepBackend`` does, to hold ``lr_scale`` around the update)."""
        self._handles = []
        if step_hooks:
            self._handles += [
                self.optimizer.register_step_pre_hook(lambda opt, args, kwargs: self.stream_step(args, kwargs)),
                self.optimizer.register_step_post_hook(lambda opt, args, kwargs: self.evict()),
            ]
        if self.masters is not None:
            self._handles += [
                self.optimizer.register_state_dict_post_hook(self._save_masters),
                self.optimizer.register_load_state_dict_pre_hook(self._take_loaded_masters),
                self.optimizer.register_load_state_dict_post_hook(self._load_masters),
            ]
        self.evict()
        return self

    def remove(self) -> None:
        """Undo ``install``: hooks removed, every state tensor back where the optimizer keeps it;
        with ``masters``, every parameter that has one is its fp32 master again, on its device."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self.resident_all()
        if self.rows is not None:
            self.rows.to_dense_state(self.optimizer)
        if self.masters is not None:
            self.masters.restore()

    def evict(self) -> None:
        """Page out every resident state tensor (before forward; after a step with a closure)."""
        moved = sum(self._page_out(p) for p in self._params())
        self._announce(-moved)
        self._host_copies_done()

    def stream_step(self, args: tuple = (), kwargs: dict | None = None) -> None:
        """Run the optimizer's update chunk by chunk, paging each chunk's state in and out, and
        release each chunk's gradients. Call it from a step pre-hook with the hook's ``args`` and
        ``kwargs``: the step itself then finds no gradient left and changes nothing."""
        kwargs = kwargs or {}
        update = getattr(type(self.optimizer).step, "__wrapped__", None)  # the step without its hooks
        args = args[1:] if args and args[0] is self.optimizer else args  # a step hook's args start with it
        closure = kwargs.get("closure", args[0] if args else None)
        if closure is not None or update is None:
            if self.masters is not None:
                raise IntegrationError(
                    "master_weights: host streams each step's master weights chunk by chunk, which a step with a "
                    "closure (LBFGS-style) cannot do: call optimizer.step() without a closure."
                )
            self._bring_all_in()
            return
        stepped = [p for p in self._params() if p.grad is not None]
        if self.masters is not None:
            self._check_masters(stepped)
        if self.rows is not None:  # split matrices: their trained rows only, a slice at a time
            split = [p for p in stepped if p in self.rows]
            stepped = [p for p in stepped if p not in self.rows]
            self.rows.step(self.optimizer, split, update, args, kwargs, self.chunk_bytes, self.masters,
                           self._announce, self._host_zeros)
        sliced = self._sliced(stepped)  # larger than a chunk: stepped last, a slice of rows at a time
        whole = {id(p) for p in stepped} - {id(p) for p in sliced}
        stepped = [p for p in stepped if id(p) in whole]
        chunks = self._chunks(stepped)
        groups = self.optimizer.param_groups
        group_params = [group["params"] for group in groups]
        group_of = {id(p): i for i, params in enumerate(group_params) for p in params}
        prefetch = self._side_stream(chunks[0][0].device) is not None if chunks else False
        event = self._bring_in(chunks[0]) if chunks else None
        try:
            for index, chunk in enumerate(chunks):
                if event is not None:
                    torch.cuda.current_stream().wait_event(event)
                next_event = self._bring_in(chunks[index + 1]) if prefetch and index + 1 < len(chunks) else None
                for group in groups:
                    group["params"] = []
                before = self._resident_bytes(chunk)
                for param in chunk:  # with masters, each parameter's master is stepped in its place
                    groups[group_of[id(param)]]["params"].append(self._stand_in(param))
                update(self.optimizer, *args, **kwargs)
                self._state_back()
                self._announce(self._resident_bytes(chunk) - before)  # state created by the update
                self._masters_back(write=True)
                self._announce(-sum(self._page_out(p) for p in chunk))
                for param in chunk:
                    param.grad = None
                self.chunks_stepped += 1
                event = next_event if prefetch else (self._bring_in(chunks[index + 1]) if index + 1 < len(chunks) else None)
        finally:
            self._state_back()  # after an update that raised: masters and weights as they were
            self._masters_back(write=False)
            self._announce(-sum(_nbytes(m) for m in self._resident_masters.values()))
            self._resident_masters = {}
            for group, params in zip(groups, group_params):
                group["params"] = params
            self._host_copies_done()
        self._step_sliced(sliced, update, args, kwargs)

    def resident_all(self) -> None:
        """Bring every paged tensor back (when detaching: the optimizer is plain again)."""
        self._bring_all_in()
        if self._stream is not None:
            torch.cuda.current_stream().wait_stream(self._stream)

    # ---------------------------------------------------------------- one unit now (in backward)
    def prefetch(self, params: Iterable[torch.Tensor]) -> None:
        """Start paging in the state (and masters) of ``params`` on the side stream, so that
        ``step_params`` finds them resident; only on CUDA, a no-op elsewhere
        (``optimizer_step: in_backward`` prefetches the unit it expects next in backward)."""
        params = list(params)
        sliced = {id(p) for p in self._sliced(params)}  # stepped by slices, never brought in whole
        params = [p for p in params if id(p) not in self._resident_masters and id(p) not in sliced]
        if params and self._side_stream(params[0].device) is not None:
            self._bring_in(params)

    def step_params(self, params: list[torch.Tensor]) -> None:
        """Step ``params`` alone now: their state (and masters) paged in, the optimizer's own
        update run on them only, the state paged out and their gradients released; one chunk of
        ``stream_step``, for ``optimizer_step: in_backward`` (``step_in_backward.py``)."""
        update = type(self.optimizer).step.__wrapped__  # the step without its hooks
        if self.masters is not None:
            self._check_masters(params)
        sliced = self._sliced(params)
        whole = {id(p) for p in params} - {id(p) for p in sliced}
        params = [p for p in params if id(p) in whole]
        if params:
            self._step_whole(params, update)
        self._step_sliced(sliced, update, (), {})

    def _step_whole(self, params: list[torch.Tensor], update: Callable) -> None:
        """``step_params`` for parameters stepped whole (one chunk)."""
        self._bring_in([p for p in params if id(p) not in self._resident_masters])
        if self._stream is not None:
            torch.cuda.current_stream().wait_stream(self._stream)  # this unit's copies (and any prefetch)
        groups = self.optimizer.param_groups
        group_params = [group["params"] for group in groups]
        group_of = {id(p): i for i, group in enumerate(group_params) for p in group}
        try:
            for group in groups:
                group["params"] = []
            before = self._resident_bytes(params)
            for param in params:
                groups[group_of[id(param)]]["params"].append(self._stand_in(param))
            update(self.optimizer)
            self._state_back()
            self._announce(self._resident_bytes(params) - before)  # state created by the update
            self._masters_back(write=True)
            self._announce(-sum(self._page_out(p) for p in params))
            for param in params:
                param.grad = None
            self.chunks_stepped += 1
        finally:
            self._state_back()  # after an update that raised: masters and weights as they were
            self._masters_back(write=False)
            for group, params_of_group in zip(groups, group_params):
                group["params"] = params_of_group

    def drop_prefetched(self) -> None:
        """Release masters prefetched for parameters that were not stepped, and page out any
        state brought in for them (after each step, and after one that raised)."""
        self._announce(-sum(_nbytes(m) for m in self._resident_masters.values()))
        self._resident_masters = {}
        self.evict()

    # ---------------------------------------------------------------- slices of large parameters
    def steps_by_rows(self) -> bool:
        """Whether parameters larger than ``chunk_bytes`` are stepped a slice of rows at a time
        (element-wise optimizers, ``row_units.ELEMENT_WISE``); others step every parameter whole."""
        from .row_units import ELEMENT_WISE

        return type(self.optimizer) in ELEMENT_WISE

    def _sliced(self, params: list[torch.Tensor]) -> list[torch.Tensor]:
        """Those of ``params`` stepped by slices of rows: larger than a chunk, element-wise
        optimizer; smallest first."""
        if not self.steps_by_rows():
            return []
        return sorted((p for p in params if p.dim() >= 1 and self._size(p) > self.chunk_bytes), key=self._size)

    def _step_sliced(self, params: list[torch.Tensor], update: Callable, args: tuple, kwargs: dict) -> None:
        """Step each of ``params`` a slice of at most ``chunk_bytes`` of rows at a time
        (``row_units.step_whole_by_rows``): one slice's state, master rows and fp32 gradient on the
        device at a time, copied synchronously, so nothing of the next slice is in flight."""
        from .row_units import step_whole_by_rows

        for param in params:
            moved = self._page_out(param)  # state left resident (loaded since the last step): to host first
            if moved:
                self._announce(-moved)
                self._host_copies_done()  # the slices read the host copies
            master = self.masters.of(param) if self.masters is not None else None
            self.slices_stepped += step_whole_by_rows(self.optimizer, param, update, args, kwargs, self.chunk_bytes,
                                                      master, self._announce, self._host_zeros)

    # ---------------------------------------------------------------- chunks
    def _params(self) -> list[torch.Tensor]:
        return [p for group in self.optimizer.param_groups for p in group["params"]]

    def _size(self, param: torch.Tensor) -> int:
        """Bytes of ``param`` as chunks count them: of the parameter stepped (with masters, its fp32 master)."""
        return param.numel() * 4 if self.masters is not None else _nbytes(param)

    def _chunks(self, params: list[torch.Tensor]) -> list[list[torch.Tensor]]:
        """Smallest first; consecutive parameters together while under ``chunk_bytes`` (of the
        parameters stepped: with masters, of the fp32 masters)."""
        size_of = self._size
        chunks: list[list[torch.Tensor]] = []
        size = 0
        for param in sorted(params, key=size_of):
            if chunks and size + size_of(param) <= self.chunk_bytes:
                chunks[-1].append(param)
                size += size_of(param)
            else:
                chunks.append([param])
                size = size_of(param)
        return chunks

    def _bring_in(self, params: Iterable[torch.Tensor], masters: bool = True):
        """Page the state of ``params`` in, and their masters if any (``masters``); on CUDA
        asynchronously: returns the event to wait for."""
        params = list(params)
        moved = sum(self._page_in(p) for p in params)
        if masters and self.masters is not None:
            moved += sum(self._master_in(p) for p in params)
        self._announce(moved)
        if self._stream is None:
            return None
        event = torch.cuda.Event()
        event.record(self._stream)
        return event

    def _bring_all_in(self) -> None:
        event = self._bring_in(self._params(), masters=False)
        if event is not None:
            torch.cuda.current_stream().wait_event(event)

    def _resident_bytes(self, params: Iterable[torch.Tensor]) -> int:
        total = 0
        for param in params:
            for value in self.optimizer.state.get(param, {}).values():
                if isinstance(value, torch.Tensor) and value not in _PAGED and value.device == param.device:
                    total += _nbytes(value)
        return total

    def _announce(self, delta: int) -> None:
        if delta:
            for listener in self.listeners:
                listener(delta)

    # ---------------------------------------------------------------- copies
    def _host_copies_done(self) -> None:
        """Wait until the host copies are written: whoever reads the state next (a checkpoint
        save, say) reads host memory without looking at our stream."""
        if self._stream is not None:
            self._stream.synchronize()

    def _side_stream(self, device: torch.device):
        if device.type != "cuda":
            return None
        if self._stream is None:
            self._stream = torch.cuda.Stream(device=device)
        return self._stream

    def _page_out(self, param: torch.Tensor) -> int:
        moved = 0
        state = self.optimizer.state.get(param)
        for key, value in (state or {}).items():
            if not isinstance(value, torch.Tensor) or value in _PAGED or value.device != param.device:
                continue  # already paged, or kept on host by the optimizer itself (Adam's step count)
            pin = self.pin if self.pin is not None else value.is_cuda
            host = torch.empty(value.shape, dtype=value.dtype, layout=value.layout, pin_memory=pin)
            stream = self._side_stream(value.device)
            if stream is not None:
                stream.wait_stream(torch.cuda.current_stream(value.device))  # the update wrote it
                with torch.cuda.stream(stream):
                    host.copy_(value, non_blocking=True)
                value.record_stream(stream)  # its memory is not reused before the copy is done
            else:
                host.copy_(value)
            _PAGED[host] = value.device
            state[key] = host
            moved += _nbytes(value)
            self.paged_out += 1
        return moved

    def _host_zeros(self, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """A zeroed state tensor made straight in host memory, paged out from ``device``."""
        pin = self.pin if self.pin is not None else device.type == "cuda"
        host = torch.zeros(shape, dtype=dtype, pin_memory=pin)
        _PAGED[host] = device
        return host

    def _page_in(self, param: torch.Tensor) -> int:
        moved = 0
        state = self.optimizer.state.get(param)
        for key, value in (state or {}).items():
            if not isinstance(value, torch.Tensor) or value not in _PAGED:
                continue
            device = _PAGED[value]
            stream = self._side_stream(device)
            if stream is not None:
                with torch.cuda.stream(stream):
                    resident = value.to(device, non_blocking=True)
                resident.record_stream(torch.cuda.current_stream(device))
            else:
                resident = value.clone()  # a new "device" tensor: the host copy is released
            state[key] = resident
            moved += _nbytes(resident)
            self.paged_in += 1
        return moved


    # ---------------------------------------------------------------- masters
    def _check_masters(self, stepped: list[torch.Tensor]) -> None:
        missing = [p for p in stepped if self.masters.of(p) is None]
        if missing:
            raise IntegrationError(
                f"{len(missing)} parameters have a gradient but no fp32 master weight (e.g. one of shape "
                f"{tuple(missing[0].shape)}): they were not trainable when slimfit.prepare_model ran, so "
                "master_weights: host made them bf16 only. Make them trainable before prepare_model."
            )

    def _master_in(self, param: torch.Tensor) -> int:
        """Copy ``param``'s fp32 master to the device (on the side stream on CUDA)."""
        host = self.masters.of(param).host
        stream = self._side_stream(param.device)
        if stream is not None:
            with torch.cuda.stream(stream):
                resident = host.to(param.device, non_blocking=True)
            resident.record_stream(torch.cuda.current_stream(param.device))
        else:
            resident = host.clone()  # a new "device" tensor, as for the state
        self._resident_masters[id(param)] = resident
        return _nbytes(resident)

    def _stand_in(self, param: torch.Tensor) -> torch.Tensor:
        """What the update steps for ``param``: the parameter itself, or (with masters) its fp32
        master holding the fp32 gradient and the parameter's state; the bf16 gradient is released."""
        if self.masters is None:
            return param
        master = self._resident_masters.pop(id(param))
        master.grad = param.grad.to(torch.float32)
        param.grad = None
        state = self.optimizer.state
        if param in state:
            state[master] = state.pop(param)
        self._standing_in.append((param, master))
        self._announce(_nbytes(master.grad))
        return master

    def _state_back(self) -> None:
        """The state of the masters stepped in the parameters' place, back under the parameters."""
        state = self.optimizer.state
        for param, master in self._standing_in:
            if master in state:
                state[param] = state.pop(master)

    def _masters_back(self, write: bool) -> None:
        """Release the stepped masters; with ``write``, each first rounded into its parameter's
        own bf16 storage (views of the weights see it) and copied back to host."""
        standing, self._standing_in = self._standing_in, []
        for param, master in standing:
            released = _nbytes(master)
            if master.grad is not None:
                released += _nbytes(master.grad)
                master.grad = None
            if write:
                with torch.no_grad():
                    param.copy_(master)
                self._master_out(self.masters.of(param).host, master)
            self._announce(-released)

    def _master_out(self, host: torch.Tensor, master: torch.Tensor) -> None:
        stream = self._side_stream(master.device)
        if stream is not None:
            stream.wait_stream(torch.cuda.current_stream(master.device))  # the update wrote it
            with torch.cuda.stream(stream):
                host.copy_(master, non_blocking=True)
            master.record_stream(stream)
        else:
            host.copy_(master)

    # ---------------------------------------------------------------- checkpoints with masters
    def _index(self) -> dict[int, int]:
        """id(param) -> the index ``Optimizer.state_dict`` gives it."""
        index: dict[int, int] = {}
        start = 0
        for group in self.optimizer.param_groups:
            for i, param in enumerate(group["params"], start):
                index.setdefault(id(param), i)
            start += len(group["params"])
        return index

    def _save_masters(self, optimizer, state_dict: dict) -> None:
        index = self._index()
        state_dict["master_weights"] = {index[id(m.param)]: m.host for m in self.masters if id(m.param) in index}

    def _take_loaded_masters(self, optimizer, state_dict: dict) -> dict | None:
        """Keep the state of parameters with masters away from torch, which would cast it to
        the bf16 parameters' dtype (``_load_masters`` puts it back, fp32 and on host)."""
        saved_ids = [i for group in state_dict["param_groups"] for i in group["params"]]
        params = self._params()
        if len(saved_ids) != len(params):
            return None  # torch says what does not match
        by_id = dict(zip(saved_ids, params))
        with_master = {i for i, p in by_id.items() if self.masters.of(p) is not None}
        saved = state_dict.get("master_weights")
        missing = sorted(with_master - set(saved or {}))
        if missing:
            raise IntegrationError(
                f"this optimizer checkpoint has no master weight for {len(missing)} parameters (e.g. "
                f"{self.masters.of(by_id[missing[0]]).name!r}): it was saved without master_weights: host. "
                "Resume with the config it was trained with."
            )
        kept = {i: s for i, s in state_dict["state"].items() if i in with_master}
        self._loading = (by_id, saved, kept, state_dict["param_groups"])
        return {**state_dict, "state": {i: s for i, s in state_dict["state"].items() if i not in with_master}}

    def _load_masters(self, optimizer) -> None:
        if self._loading is None:
            return
        by_id, saved, kept, saved_groups = self._loading
        self._loading = None
        for i, value in saved.items():
            master = self.masters.of(by_id[i]) if i in by_id else None
            if master is not None:
                self.masters.load_master(master, value)
        for i, state in kept.items():
            param = by_id[i]
            self.optimizer.state[param] = {key: self._loaded_state(param, key, value, i, saved_groups) for key, value in state.items()}

    def _loaded_state(self, param: torch.Tensor, key: Any, value: Any, index: int, saved_groups: list) -> Any:
        """A loaded state value: floating tensors fp32 as saved and straight into host memory
        (paged: no device copy of the whole state at load), the rest as torch loads it."""
        if not isinstance(value, torch.Tensor):
            return value
        if key == "step" or not value.is_floating_point():
            return torch.optim.Optimizer._process_value_according_to_param_policy(param, value, index, saved_groups, key)
        pin = self.pin if self.pin is not None else param.is_cuda
        host = torch.empty(value.shape, dtype=value.dtype, pin_memory=pin)
        host.copy_(value)
        _PAGED[host] = param.device
        return host


def paged_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of ``optimizer``'s state that are paged out to host memory now."""
    total = 0
    for state in optimizer.state.values():
        for value in state.values():
            if isinstance(value, torch.Tensor) and value in _PAGED:
                total += value.numel() * value.element_size()
    return total
