"""Exact memory accounting of a training step, by category, on any device.

Every figure is a sum of ``numel * element_size`` over real tensors, not an allocator estimate,
so it means the same on CPU, CUDA or anything else:

- ``params``: model parameters, each storage once (tied weights once); under DeepSpeed ZeRO-3 the
  rank's partition (``param.ds_tensor``). Under FSDP2 every figure counts this rank's shard of a
  ``DTensor`` (parameters, gradients, optimizer state). With ``frozen_weights: int8`` a stored
  weight counts as its int8 codes and fp32 row scales, plus its full copy while it trains
  (``frozen_int8.py``).
- ``grads``: gradients alive, followed as backward creates them (post-accumulate-grad hooks) and
  as they are freed (``zero_grad(set_to_none=True)``); the figure is the peak within the step.
  Under DeepSpeed the fp32 partitions' gradients are counted at the optimizer step.
- ``optimizer``: every tensor in the optimizer's state (Adam moments, step counts) plus
  parameter copies the optimizer steps that are not model parameters (fp32 masters, DeepSpeed's
  flat fp32 partitions). Accepts a torch optimizer, Accelerate's ``AcceleratedOptimizer`` and a
  DeepSpeed ZeRO optimizer (anything with ``.optimizer`` down to a torch optimizer). State paged
  to host memory by ``optimizer_paging`` (``paging.py``) is not in it but in ``optimizer_paged``
  (not part of ``total``: it is off the accelerator; on CPU, what would be); the state paging
  streams through the step is counted while it is resident (``optimizer_resident_changed``).
- ``master_paged``: fp32 master weights kept in host memory (``master_weights: host``); not in
  ``total``, like ``optimizer_paged``. Parameters are then the bf16 device weights; the masters
  and fp32 gradients of the chunk being stepped count in ``optimizer`` while on the device.
- ``weights_host``: parameters kept in host memory (``input_embedding: host``); not in
  ``total``, like ``optimizer_paged``, and not in ``params``.
- ``activations``: tensors autograd saves for backward, from a ``CompressionEngine``'s byte
  counters: ``activations_raw`` is what autograd would keep, ``activations`` what is kept (after
  compression). Without an engine of its own to read, the meter installs one that compresses
  nothing and counts exactly what autograd saves.
- ``total``: the peak within the step of params + optimizer + live grads + live activations,
  updated whenever activations or gradients grow and after every optimizer step.
- Figures are this process's. Under several ranks the report says so (``RankScope``), and
  under DeepSpeed ZeRO which categories are this rank's partition; ``gather_ranks`` adds the
  last step summed over all ranks.
- ``peak_cuda``: on CUDA, also ``torch.cuda.max_memory_allocated`` (reset at each step start),
  which includes what the categories do not (temporaries, allocator rounding, workspaces).
- Sampling (``every=N``): the owner measures only some steps (SlimFit: every N-th optimizer
  step, ``memory_meter`` in the config). The meter's hooks (its counting engine, the gradient,
  optimizer and counter hooks) are then installed when a measured step begins and removed when
  it ends, so the steps in between run none of its code; the report's peaks are over the
  measured steps and say so.

Example::

    meter = MemoryMeter(model, optimizer)                 # or engine=slimfit.compression
    for batch in loader:
        with meter.step():
            loss = model(**batch).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    print(meter.last.total, meter.summary().render())
    meter.close()
"""

from __future__ import annotations

import io
import time
import weakref
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Iterator

import torch
from torch import nn

from .compression.engine import CompressionEngine
from .compression.policy import CompressionPolicy
from .integrations.fsdp import is_dtensor, local_shard
from .frozen_int8 import device_tensors as int8_device_tensors
from .host_embedding import is_on_host
from .paging import is_paged

CATEGORIES = ("params", "grads", "optimizer", "activations", "activations_raw", "total")


def _nbytes(tensor: torch.Tensor) -> int:
    tensor = local_shard(tensor)  # FSDP2: this rank's bytes
    return tensor.numel() * tensor.element_size()


def _key(tensor: torch.Tensor) -> tuple[int, int]:
    """Identity of the memory a tensor covers: two views of the same bytes count once."""
    tensor = local_shard(tensor)
    return (tensor.data_ptr(), _nbytes(tensor))


def _tensors(obj: Any) -> Iterator[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, dict):
        for value in obj.values():
            yield from _tensors(value)
    elif isinstance(obj, (list, tuple)):
        for value in obj:
            yield from _tensors(value)


def parameter_bytes(model: nn.Module) -> int:
    """Bytes of ``model``'s parameters on this rank's device; shared storage and tied weights once
    (parameters ``input_embedding: host`` keeps in host memory are not on the device)."""
    seen: set[tuple[int, int]] = set()
    total = 0
    for param in model.parameters():
        if is_on_host(param):
            continue
        tensor = getattr(param, "ds_tensor", None)  # ZeRO-3: the local partition
        tensor = tensor if isinstance(tensor, torch.Tensor) else param
        for held in int8_device_tensors(param) or [tensor]:  # frozen_weights: int8: codes and scales
            key = _key(held)
            if key not in seen:
                seen.add(key)
                total += _nbytes(held)
    return total


def optimizer_chain(optimizer: Any) -> list[Any]:
    """``optimizer`` and what it wraps through ``.optimizer`` (Accelerate, DeepSpeed ZeRO)."""
    chain = []
    while optimizer is not None and all(optimizer is not seen for seen in chain):
        chain.append(optimizer)
        optimizer = getattr(optimizer, "optimizer", None)
    return chain


def innermost_torch_optimizer(optimizer: Any) -> torch.optim.Optimizer | None:
    torch_optimizers = [o for o in optimizer_chain(optimizer) if isinstance(o, torch.optim.Optimizer)]
    return torch_optimizers[-1] if torch_optimizers else None


def optimizer_bytes(optimizer: Any, model: nn.Module | None = None) -> int:
    """Bytes of optimizer state: state tensors plus stepped copies that are not model parameters.

    Counts the innermost torch optimizer's ``state`` and the tensors it steps (in its
    ``param_groups`` or keying its state) that are not ``model``'s parameters (fp32 masters,
    DeepSpeed's flat partitions); each byte once. State paged to host is left out (see
    ``paged_optimizer_bytes``).
    """
    inner = innermost_torch_optimizer(optimizer)
    if inner is None:
        return 0
    model_keys = set()
    if model is not None:
        for param in model.parameters():
            model_keys.add(_key(param))
            partition = getattr(param, "ds_tensor", None)
            if isinstance(partition, torch.Tensor):
                model_keys.add(_key(partition))
    candidates = [t for state in inner.state.values() for t in _tensors(state) if not is_paged(t)]
    # Stepped copies: what the groups hold now, and what has state (ZeRO-3 empties its groups
    # between steps but keys the state by its fp32 partitions).
    stepped = [p for group in inner.param_groups for p in group["params"]]
    stepped += [p for p in inner.state if isinstance(p, torch.Tensor)]
    candidates += [p for p in stepped if _key(p) not in model_keys]
    return _covered_bytes(candidates)


def paged_optimizer_bytes(optimizer: Any) -> int:
    """Bytes of optimizer state paged out to host memory (``optimizer_paging``)."""
    inner = innermost_torch_optimizer(optimizer)
    if inner is None:
        return 0
    return sum(_nbytes(t) for state in inner.state.values() for t in _tensors(state) if is_paged(t))


def _covered_bytes(tensors: list[torch.Tensor]) -> int:
    """Bytes the tensors cover, each byte once: views may overlap (during a ZeRO step the
    optimizer holds slices of DeepSpeed's flat partitions and state next to the flat tensors)."""
    spans: dict[int, list[tuple[int, int]]] = {}
    for tensor in map(local_shard, tensors):
        if tensor.numel():
            start = tensor.data_ptr()
            spans.setdefault(tensor.untyped_storage().data_ptr(), []).append((start, start + _nbytes(tensor)))
    total = 0
    for ranges in spans.values():
        ranges.sort()
        low, high = ranges[0]
        for start, end in ranges[1:]:
            if start > high:
                total += high - low
                low, high = start, end
            else:
                high = max(high, end)
        total += high - low
    return total


def counting_engine(model: nn.Module) -> CompressionEngine:
    """An engine that compresses nothing and counts exactly what autograd saves in ``model``."""
    return CompressionEngine(model, CompressionPolicy(), swap_layernorm=False)


@dataclass
class StepMemory:
    """Bytes of one step by category (see the module docstring); ``time_s`` is its wall time."""

    step: int = 0
    params: int = 0
    grads: int = 0
    optimizer: int = 0
    activations: int = 0
    activations_raw: int = 0
    total: int = 0
    peak_cuda: int | None = None
    time_s: float = 0.0
    optimizer_paged: int = 0
    master_paged: int = 0
    weights_host: int = 0
    optimizer_step: int | None = None  # the training step it belongs to, when the owner says

    @property
    def compression_ratio(self) -> float:
        return self.activations_raw / self.activations if self.activations else 1.0


_ZERO_PARTITIONED = {1: "optimizer state", 2: "gradients and optimizer state", 3: "parameters, gradients and optimizer state"}


@dataclass
class RankScope:
    """Whose memory the figures are: this process's, one of ``world_size`` ranks; under
    DeepSpeed ZeRO (``zero_stage``) the partitioned categories hold only this rank's slice, under
    FSDP2 (``fsdp2``) every category but activations."""

    rank: int = 0
    world_size: int = 1
    zero_stage: int | None = None
    fsdp2: bool = False

    def describe(self) -> str:
        if self.world_size == 1 and not self.zero_stage and not self.fsdp2:
            return "this process"
        text = f"per rank (rank {self.rank} of {self.world_size})"
        if self.zero_stage:
            text += f"; ZeRO-{self.zero_stage}: {_ZERO_PARTITIONED[self.zero_stage]} are this rank's partition"
        if self.fsdp2:
            text += "; FSDP2: parameters, gradients and optimizer state are this rank's shard"
        return text


def rank_scope(optimizer: Any = None) -> RankScope:
    """This process's rank and world size, and the ZeRO stage of ``optimizer``'s chain if any
    (or FSDP2: the optimizer steps ``DTensor`` shards)."""
    import torch.distributed as dist

    scope = RankScope()
    if dist.is_available() and dist.is_initialized():
        scope.rank, scope.world_size = dist.get_rank(), dist.get_world_size()
    for wrapped in optimizer_chain(optimizer) if optimizer is not None else []:
        kind = type(wrapped).__name__
        if kind == "DeepSpeedZeroOptimizer_Stage3":
            scope.zero_stage = 3
        elif kind == "DeepSpeedZeroOptimizer":
            scope.zero_stage = 2 if getattr(wrapped, "partition_gradients", False) else 1
        elif isinstance(wrapped, torch.optim.Optimizer):
            scope.fsdp2 = any(is_dtensor(p) for group in wrapped.param_groups for p in group["params"])
    return scope


_SUMMED = ("params", "grads", "optimizer", "activations", "activations_raw", "total", "optimizer_paged", "master_paged",
           "weights_host")


@dataclass
class MemoryReport:
    """``last``: the last measured block (a forward/backward pass, with the optimizer step when
    it ran inside); ``peak``: each category's largest value over all blocks; ``steps``: how
    many blocks were measured (micro-batches under gradient accumulation); ``every``: 1 when
    every step was measured, N when only every N-th optimizer step was (peaks over those).

    ``scope`` says whose figures they are (see ``RankScope``). ``all_ranks``, filled by
    ``gather_ranks``, is the last step summed over every rank (what the whole job holds).
    """

    steps: int
    last: StepMemory
    peak: StepMemory
    mean_step_time_s: float
    by_compressor: dict[str, list[int]] = field(default_factory=dict)
    scope: RankScope = field(default_factory=RankScope)
    all_ranks: StepMemory | None = None
    every: int = 1

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def render(self, width: int = 100) -> str:
        """A plain-text table for logs and terminals."""
        from rich.console import Console
        from rich.table import Table

        # One measured block per forward/backward pass: under gradient accumulation several make
        # one optimizer step (the freeze report counts those).
        title = f"Memory by category ({self.steps} forward/backward passes), {self.scope.describe()}"
        # The sampling note goes under the table: a longer title would wrap the rank label.
        caption = f"measured every {self.every} optimizer steps (memory_meter)" if self.every > 1 else None
        table = Table(title=title, caption=caption, show_header=True, header_style="bold")
        table.add_column("category")
        table.add_column("last step", justify="right")
        table.add_column("peak over steps", justify="right")
        if self.all_ranks is not None:
            table.add_column(f"last step, sum of {self.scope.world_size} ranks", justify="right")
        masters = bool(self.peak.master_paged)
        optimizer_label = "optimizer state"
        if masters:
            optimizer_label += ", fp32 masters and gradients streamed through the step, on device (peak)"
        elif self.peak.optimizer_paged:
            optimizer_label += ", on device (peak)"
        rows = [
            ("parameters" + (" (bf16)" if masters else ""), "params"),
            ("gradients (peak live)", "grads"),
            # under paging: the most the streamed optimizer step held on the device at once
            (optimizer_label, "optimizer"),
            *([("optimizer state, paged to host", "optimizer_paged")] if self.peak.optimizer_paged else []),
            *([("fp32 master weights, on host", "master_paged")] if masters else []),
            *([("input embedding, on host", "weights_host")] if self.peak.weights_host else []),
            ("saved activations, raw (peak live)", "activations_raw"),
            ("saved activations, stored (peak live)", "activations"),
            ("total (peak of the sum)", "total"),
        ]
        gathered = self.all_ranks is not None
        for label, name in rows:
            row = [label, format_bytes(getattr(self.last, name)), format_bytes(getattr(self.peak, name))]
            table.add_row(*row, *([format_bytes(getattr(self.all_ranks, name))] if gathered else []))
        ratio = [f"{self.last.compression_ratio:.2f}x", f"{self.peak.compression_ratio:.2f}x"]
        table.add_row("activation compression", *ratio, *([f"{self.all_ranks.compression_ratio:.2f}x"] if gathered else []))
        if self.last.peak_cuda is not None:
            table.add_row("CUDA allocator peak", format_bytes(self.last.peak_cuda), format_bytes(self.peak.peak_cuda or 0))
        table.add_row("step time", f"{self.last.time_s:.3f} s", f"mean {self.mean_step_time_s:.3f} s")
        out = io.StringIO()
        Console(file=out, width=width, force_terminal=False, color_system=None).print(table)
        return out.getvalue()


class _GradTracker:
    """Live gradient bytes: added when backward sets a new ``.grad``, released when it is freed."""

    def __init__(self, on_grow):
        self.live = 0
        self._on_grow = on_grow
        self._grads: dict[int, weakref.ref] = {}  # id(param) -> its grad we count
        self._handles: dict[int, Any] = {}

    def watch(self, params) -> None:
        """Hook every parameter not hooked yet, frozen or not (freezing changes per step, and the
        hook stays through ``requires_grad`` changes); count gradients that already exist."""
        for param in params:
            if id(param) not in self._handles:
                frozen = not param.requires_grad
                if frozen:  # torch only hooks tensors that require grad: flip it for the call
                    param.requires_grad_(True)
                try:
                    self._handles[id(param)] = param.register_post_accumulate_grad_hook(self._accumulated)
                finally:
                    if frozen:
                        param.requires_grad_(False)
            if param.grad is not None:
                self._count(param)

    def _accumulated(self, param: torch.Tensor) -> None:
        if self._count(param):
            self._on_grow()

    def _count(self, param: torch.Tensor) -> bool:
        grad = param.grad
        ref = self._grads.get(id(param))
        if grad is None or (ref is not None and ref() is grad):
            return False  # accumulated in place: same bytes
        nbytes = _nbytes(grad)
        self.live += nbytes
        self._grads[id(param)] = weakref.ref(grad)
        weakref.finalize(grad, self._release, nbytes)
        return True

    def _release(self, nbytes: int) -> None:
        self.live -= nbytes

    def close(self) -> None:
        for handle in self._handles.values():
            handle.remove()
        self._handles.clear()


class MemoryMeter:
    """Measures each training step by category, exactly; see the module docstring.

    ``engine``: the ``CompressionEngine`` whose counters give the saved activations (e.g.
    ``slimfit.compression``); whoever owns it enters its ``step()``. Without one, the meter makes
    a counting engine (no compression, stock LayerNorm) and enters it in ``step()`` itself; pass
    ``count_activations=False`` to count no activations at all. ``masters``: the fp32 master
    weights kept on host (``master_weights: host``), reported as ``master_paged``. ``host_weights``:
    what keeps parameters in host memory (``HostEmbedding``), reported as ``weights_host``. ``every``:
    the owner enters ``step()`` only every N-th training step; with N > 1 the meter's hooks
    exist only inside ``step()`` (see "Sampling" in the module docstring).
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: Any = None,
        engine: CompressionEngine | None = None,
        *,
        count_activations: bool = True,
        masters: Any = None,
        every: int = 1,
        host_weights: Any = None,
    ):
        if every < 1:
            raise ValueError(f"MemoryMeter(every={every}): measure every N-th step with N >= 1")
        self.model = model
        self.optimizer = optimizer
        self.masters = masters
        self.host_weights = host_weights
        self.every = every
        self._sampled = every > 1
        self._own_engine = engine is None and count_activations
        self.engine = counting_engine(model) if self._own_engine else engine
        self._counter = self.engine._counter if self.engine is not None else None  # noqa: SLF001 (engine's byte counter)
        self._grads = _GradTracker(self._update)
        self._opt_handles: list[Any] = []
        self._params = 0
        self._optimizer = 0
        self._extra_grads = 0  # gradients of optimizer-owned copies (DeepSpeed fp32 partitions)
        self._current: StepMemory | None = None
        self._steps = 0
        self._time_sum = 0.0
        self._peak = StepMemory()
        self.last: StepMemory | None = None
        self._by_compressor: dict[str, list[int]] = {}
        self._inner = innermost_torch_optimizer(optimizer) if optimizer is not None else None
        self._hooked = False
        if not self._sampled:
            self._hook()

    def _hook(self) -> None:
        """Install the meter's hooks (its counting engine's too); idempotent."""
        if self._hooked:
            return
        self._hooked = True
        if self._own_engine:
            self.engine.attach()
        if self._counter is not None:
            self._counter.listeners.append(self._update)
        inner = self._inner
        if inner is not None:
            self._opt_handles = [
                inner.register_step_pre_hook(lambda *_: self._optimizer_step_start(inner)),
                inner.register_step_post_hook(lambda *_: self._optimizer_step_end()),
            ]

    def _unhook(self) -> None:
        """Remove every hook ``_hook`` and ``step`` installed; gradients counted stay counted
        until freed."""
        self._grads.close()
        for handle in self._opt_handles:
            handle.remove()
        self._opt_handles = []
        if self._counter is not None and self._update in self._counter.listeners:
            self._counter.listeners.remove(self._update)
        if self._own_engine and self.engine is not None:
            self.engine.detach()
        self._hooked = False

    # ---------------------------------------------------------------- the step
    @contextmanager
    def step(self, optimizer_step: int | None = None) -> Iterator[StepMemory]:
        """Measure the block (forward, backward, optimizer step) as one step; ``optimizer_step``
        labels it with the training step it belongs to."""
        if self._sampled:
            self._hook()
        device = self._device()
        cuda = device is not None and device.type == "cuda"
        if cuda:
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
        self._params = parameter_bytes(self.model)
        self._optimizer = optimizer_bytes(self.optimizer, self.model) if self.optimizer is not None else 0
        paged = paged_optimizer_bytes(self.optimizer) if self.optimizer is not None else 0
        self._extra_grads = 0
        self._grads.watch(self.model.parameters())
        masters = self.masters.host_bytes() if self.masters is not None else 0
        host = self.host_weights.host_bytes() if self.host_weights is not None else 0
        current = self._current = StepMemory(
            step=self._steps, params=self._params, optimizer=self._optimizer, optimizer_paged=paged, master_paged=masters,
            weights_host=host, optimizer_step=optimizer_step,
        )
        self._update()
        start = time.perf_counter()
        with ExitStack() as stack:
            if self._own_engine:
                stack.enter_context(self.engine.step())
            try:
                yield current
            finally:
                if cuda:
                    torch.cuda.synchronize(device)
                current.time_s = time.perf_counter() - start
                self._update()
                if cuda:
                    current.peak_cuda = int(torch.cuda.max_memory_allocated(device))
                if self.engine is not None:
                    self._by_compressor = {k: list(v) for k, v in self.engine.stats.by_compressor.items()}
                self._current = None
                self._finish(current)
                if self._sampled:
                    self._unhook()

    def summary(self) -> MemoryReport:
        """Last step and per-category peak over all steps measured so far, on this rank."""
        last = self.last or StepMemory()
        mean = self._time_sum / self._steps if self._steps else 0.0
        return MemoryReport(
            steps=self._steps, last=last, peak=self._peak, mean_step_time_s=mean,
            by_compressor=self._by_compressor, scope=rank_scope(self.optimizer), every=self.every,
        )

    def close(self) -> None:
        """Remove every hook (and the meter's own engine)."""
        self._unhook()

    # ---------------------------------------------------------------- internals
    def _update(self) -> None:
        current = self._current
        if current is None:
            return
        grads = self._grads.live + self._extra_grads
        live_packed = self._counter.live_packed if self._counter is not None else 0
        live_raw = self._counter.live_raw if self._counter is not None else 0
        if grads > current.grads:
            current.grads = grads
        if live_packed > current.activations:
            current.activations = live_packed
        if live_raw > current.activations_raw:
            current.activations_raw = live_raw
        total = self._params + self._optimizer + grads + live_packed
        if total > current.total:
            current.total = total

    def optimizer_resident_changed(self, delta: int) -> None:
        """Optimizer state moved onto (+) or off (-) the device mid-step (``OptimizerPaging``
        tells the meter through its ``listeners``)."""
        self._optimizer += delta
        if self._current is not None:
            self._current.optimizer = max(self._current.optimizer, self._optimizer)
        self._update()

    def _optimizer_step_start(self, inner: torch.optim.Optimizer) -> None:
        # Gradients of stepped copies that are not model parameters (DeepSpeed's fp32
        # partitions): not seen by the parameter hooks, alive for the optimizer step.
        model_keys = {_key(p) for p in self.model.parameters()}
        seen: set[tuple[int, int]] = set()
        extra = 0
        for group in inner.param_groups:
            for p in group["params"]:
                if p.grad is not None and _key(p) not in model_keys and _key(p.grad) not in seen:
                    seen.add(_key(p.grad))
                    extra += _nbytes(p.grad)
        self._extra_grads = extra
        self._update()

    def _optimizer_step_end(self) -> None:
        # Optimizer state is created lazily in the first step, while the gradients are alive.
        self._optimizer = optimizer_bytes(self.optimizer, self.model)
        if self._current is not None:
            self._current.optimizer = max(self._current.optimizer, self._optimizer)
            self._current.optimizer_paged = max(self._current.optimizer_paged, paged_optimizer_bytes(self.optimizer))
        self._update()
        self._extra_grads = 0

    def _finish(self, current: StepMemory) -> None:
        self.last = current
        self._steps += 1
        self._time_sum += current.time_s
        peak = self._peak
        for f in fields(StepMemory):
            if f.name in ("step", "time_s"):
                continue
            value = getattr(current, f.name)
            if value is not None and (getattr(peak, f.name) is None or value > getattr(peak, f.name)):
                setattr(peak, f.name, value)
        peak.step = current.step
        peak.time_s = max(peak.time_s, current.time_s)

    def _device(self) -> torch.device | None:
        for param in self.model.parameters():
            if not is_on_host(param):
                return param.device
        return None


def gather_ranks(report: MemoryReport) -> MemoryReport:
    """Fill ``report.all_ranks``: the last step's figures summed over every rank.

    A collective: every rank must call it (one all-reduce of a few integers). Under ZeRO the sum
    of the partitioned categories is what the job holds in total; a single process gets its own
    figures back.
    """
    import torch.distributed as dist

    values = torch.tensor([getattr(report.last, name) for name in _SUMMED], dtype=torch.int64)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        if dist.get_backend() == "nccl":
            values = values.cuda()
        dist.all_reduce(values)
    report.all_ranks = StepMemory(step=report.last.step, **dict(zip(_SUMMED, values.cpu().tolist())))
    return report


def format_bytes(n: int | float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n} B"
