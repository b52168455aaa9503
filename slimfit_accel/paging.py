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

from typing import Callable, Iterable

import torch
from torch.utils.weak import WeakIdKeyDictionary

_PAGED: WeakIdKeyDictionary = WeakIdKeyDictionary()

#: Small parameters are stepped together up to this many bytes of parameters (fewer launches).
DEFAULT_CHUNK_BYTES = 32 * 2**20


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
    (the memory meter follows the state this way).
    """

    def __init__(self, optimizer: torch.optim.Optimizer, pin: bool | None = None, chunk_bytes: int = DEFAULT_CHUNK_BYTES):
        self.optimizer = optimizer
        self.pin = pin
        self.chunk_bytes = chunk_bytes
        self.listeners: list[Callable[[int], None]] = []
        self._stream = None
        self.paged_out = 0  # tensors copied out so far (for tests and reports)
        self.paged_in = 0
        self.chunks_stepped = 0
        self._handles: list = []

    # ---------------------------------------------------------------- the calls
    def install(self) -> "OptimizerPaging":
        """Stream every ``optimizer.step()`` from now on (step pre- and post-hooks)."""
        self._handles = [
            self.optimizer.register_step_pre_hook(lambda opt, args, kwargs: self.stream_step(args, kwargs)),
            self.optimizer.register_step_post_hook(lambda opt, args, kwargs: self.evict()),
        ]
        self.evict()
        return self

    def remove(self) -> None:
        """Undo ``install``: hooks removed, every state tensor back where the optimizer keeps it."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self.resident_all()

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
            self._bring_all_in()
            return
        chunks = self._chunks([p for p in self._params() if p.grad is not None])
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
                for param in chunk:
                    groups[group_of[id(param)]]["params"].append(param)
                before = self._resident_bytes(chunk)
                update(self.optimizer, *args, **kwargs)
                self._announce(self._resident_bytes(chunk) - before)  # state created by the update
                self._announce(-sum(self._page_out(p) for p in chunk))
                for param in chunk:
                    param.grad = None
                self.chunks_stepped += 1
                event = next_event if prefetch else (self._bring_in(chunks[index + 1]) if index + 1 < len(chunks) else None)
        finally:
            for group, params in zip(groups, group_params):
                group["params"] = params
            self._host_copies_done()

    def resident_all(self) -> None:
        """Bring every paged tensor back (when detaching: the optimizer is plain again)."""
        self._bring_all_in()
        if self._stream is not None:
            torch.cuda.current_stream().wait_stream(self._stream)

    # ---------------------------------------------------------------- chunks
    def _params(self) -> list[torch.Tensor]:
        return [p for group in self.optimizer.param_groups for p in group["params"]]

    def _chunks(self, params: list[torch.Tensor]) -> list[list[torch.Tensor]]:
        """Smallest first; consecutive parameters together while under ``chunk_bytes``."""
        chunks: list[list[torch.Tensor]] = []
        size = 0
        for param in sorted(params, key=_nbytes):
            if chunks and size + _nbytes(param) <= self.chunk_bytes:
                chunks[-1].append(param)
                size += _nbytes(param)
            else:
                chunks.append([param])
                size = _nbytes(param)
        return chunks

    def _bring_in(self, params: Iterable[torch.Tensor]):
        """Page the state of ``params`` in; on CUDA asynchronously: returns the event to wait for."""
        moved = sum(self._page_in(p) for p in params)
        self._announce(moved)
        if self._stream is None:
            return None
        event = torch.cuda.Event()
        event.record(self._stream)
        return event

    def _bring_all_in(self) -> None:
        event = self._bring_in(self._params())
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


def paged_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of ``optimizer``'s state that are paged out to host memory now."""
    total = 0
    for state in optimizer.state.values():
        for value in state.values():
            if isinstance(value, torch.Tensor) and value in _PAGED:
                total += value.numel() * value.element_size()
    return total
