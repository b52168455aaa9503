"""Optimizer state only where training happens: frozen units' state is paged to host memory.

A unit frozen in a step has no gradient, so a torch optimizer neither reads nor writes its
state (Adam moments, momentum buffers) in that step. ``OptimizerPaging`` moves that state off
the accelerator when the freeze decision is taken and brings it back before the unit trains
again. Each decision, before the forward pass:

- state of parameters frozen now and resident is copied out to host memory (pinned on CUDA);
- state of parameters trained now and paged is copied back, on a side stream on CUDA, so the
  transfer overlaps forward and backward; the optimizer step waits for it (``ready()``).

Copies are exact, so training is bit-identical to keeping everything resident. On CPU the same
steps run (host and device are the same memory, the copies are real); the memory meter then
reports what would stay device-resident (``optimizer``) apart from what is paged
(``optimizer_paged``): paged state tensors are tagged (``is_paged``).

Applies to ``torch.optim`` optimizers, one device or DDP (each rank pages its own state).
Under DeepSpeed ZeRO the state lives in flat partitions that cannot be split by unit: there
``optimizer_paging`` is a no-op (SlimFit warns once at attach, nothing is copied, so nothing is
duplicated); DeepSpeed's ``offload_optimizer`` keeps that state on host instead.

Example::

    paging = OptimizerPaging(optimizer)
    paging.plan(frozen_params)      # when the step's decision is known, before forward
    ...                             # forward, backward
    paging.ready()                  # just before optimizer.step()
"""

from __future__ import annotations

from typing import Collection

import torch
from torch.utils.weak import WeakIdKeyDictionary

_PAGED: WeakIdKeyDictionary = WeakIdKeyDictionary()


def is_paged(tensor: torch.Tensor) -> bool:
    """Whether ``tensor`` is optimizer state paged out to host memory by ``OptimizerPaging``."""
    return tensor in _PAGED


class OptimizerPaging:
    """Keeps the optimizer state of frozen parameters in host memory; see the module docstring.

    ``pin``: pin host copies (default: when the parameters are on CUDA), so copies can be
    asynchronous.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, pin: bool | None = None):
        self.optimizer = optimizer
        self.pin = pin
        self._stream = None
        self._event = None
        self.paged_out = 0  # tensors copied out so far (for tests and reports)
        self.paged_in = 0

    # ---------------------------------------------------------------- the two calls
    def plan(self, frozen: Collection[torch.nn.Parameter]) -> None:
        """Page out the state of ``frozen`` parameters, prefetch the state of every other one."""
        frozen_ids = {id(p) for p in frozen}
        for group in self.optimizer.param_groups:
            for param in group["params"]:
                state = self.optimizer.state.get(param)
                if not state:
                    continue  # no state yet: created on the device at its first step
                if id(param) in frozen_ids:
                    self._page_out(param, state)
                else:
                    self._page_in(param, state)
        if self._stream is not None:
            self._event = torch.cuda.Event()
            self._event.record(self._stream)

    def ready(self) -> None:
        """Make the optimizer's stream wait for the prefetches (call before the step)."""
        if self._event is not None:
            torch.cuda.current_stream().wait_event(self._event)
            self._event = None

    def resident_all(self) -> None:
        """Bring every paged tensor back (e.g. before saving or when detaching)."""
        self.plan(())
        self.ready()

    # ---------------------------------------------------------------- copies
    def _side_stream(self, device: torch.device):
        if device.type != "cuda":
            return None
        if self._stream is None:
            self._stream = torch.cuda.Stream(device=device)
        return self._stream

    def _page_out(self, param: torch.Tensor, state: dict) -> None:
        for key, value in state.items():
            if not isinstance(value, torch.Tensor) or value in _PAGED or value.device != param.device:
                continue  # already paged, or kept on host by the optimizer itself (Adam's step count)
            pin = self.pin if self.pin is not None else value.is_cuda
            host = torch.empty(value.shape, dtype=value.dtype, layout=value.layout, pin_memory=pin)
            stream = self._side_stream(value.device)
            if stream is not None:
                stream.wait_stream(torch.cuda.current_stream(value.device))  # the last step wrote it
                with torch.cuda.stream(stream):
                    host.copy_(value, non_blocking=True)
                value.record_stream(stream)  # its memory is not reused before the copy is done
            else:
                host.copy_(value)
            _PAGED[host] = value.device
            state[key] = host
            self.paged_out += 1

    def _page_in(self, param: torch.Tensor, state: dict) -> None:
        for key, value in state.items():
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
            self.paged_in += 1


def paged_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of ``optimizer``'s state that are paged out to host memory now."""
    total = 0
    for state in optimizer.state.values():
        for value in state.values():
            if isinstance(value, torch.Tensor) and value in _PAGED:
                total += value.numel() * value.element_size()
    return total
