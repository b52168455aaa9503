"""The compression engine: saved-tensor hooks that pack what autograd keeps for backward.

``torch.autograd.graph.saved_tensors_hooks`` hands the engine every tensor autograd saves; the
module context (forward pre/post hooks) says which module saved it, whether that module is frozen
this step, and the tensor's role where it can be told. The policy picks a compressor; the forward
pass itself is never changed. No model code is forked, so any ``nn.Module`` works (BERT, ViT,
decoder-only models; eager or SDPA attention).

What is never compressed: parameters (including views, autocast copies, ZeRO-3 gathers, tied
weights), non-floating tensors (dropout masks, indices), tensors below ``policy.min_numel`` elements or
``policy.min_ndim`` dimensions, and tensors tagged ``roles.EXACT_ROLE`` (gradients computed in
forward, such as the chunked loss's for a frozen head).
Tensors come back in their own dtype (bf16/fp16 included).

A tensor saved several times (e.g. a LayerNorm output read by Q, K and V) is packed once per
compressor and counted once, as long as its storage is alive and unmodified, and decompressed
once for the saves whose backwards run in a row (``_Saved``).

Gradient checkpointing: the checkpoint's own saved-tensor hooks are innermost inside checkpointed
blocks, so with non-reentrant checkpointing (the default of torch and transformers) nothing inside
a block is saved and nothing there is compressed; tensors saved outside the blocks (embeddings,
head, loss) are compressed as usual. With reentrant checkpointing the block inputs are saved by
the checkpoint function in the context of the enclosing module; the recomputation in backward is
compressed by the policy too if backward runs inside the engine's ``step()``. Either way, run
backward while the engine is attached: the recomputation must use the same (swapped) LayerNorm
as the forward, or non-reentrant checkpointing raises a CheckpointError about saved-tensor counts.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Callable, Iterator, Mapping
import weakref

import torch
from torch import nn

from ..errors import ConfigError, PluginError
from ..hookspecs import Compressor, SavedTensorContext
from .accounting import ByteCounter, StepStats, packed_bytes, tensor_bytes
from .context import ModuleContext, _storage_ptr
from .gated_mlp import swap_gated_mlps
from .kinds import module_kinds
from .layernorm import swap_layernorms
from .rmsnorm import swap_rmsnorms
from .policy import CompressionPolicy, CompressorSpec, slimfit_policy
from .roles import EXACT_ROLE, tagged_role

try:  # a weak reference to a storage: tells whether an address may have been reused
    from torch.multiprocessing.reductions import StorageWeakRef
except ImportError:  # pragma: no cover
    StorageWeakRef = None  # type: ignore[assignment,misc]

KEPT = "-"  # by_compressor name for tensors kept as they are (not floating, too small)


#: Unpacked tensors up to this size are handed to all of a holder's saves, whatever runs between
#: them (rotary cos/sin, saved twice by every layer: 128 KiB each at 512 tokens); larger ones only
#: to the next unpack (``_Saved``).
KEEP_UNPACKED_BYTES = 1 << 20


class _Saved:
    """What autograd holds instead of a saved tensor; releases its bytes when freed.

    ``saves``: how many autograd nodes hold it. A holder saved several times is decompressed
    once and the result handed to its other saves (the same values: autograd never writes into
    an unpacked tensor). ``reuse``: ``"all"`` keeps the result until every save has had it (a
    loss's log-probabilities, saved by the log-softmax and the NLL loss whose backwards run one
    right after the other; small tensors); ``"next"`` keeps it only until another holder is
    decompressed (large tensors: a Linear input read by q, k and v, whose backwards run in a
    row), so at most one large unpacked tensor waits, and only between nodes that would each
    allocate it anyway; a false value decompresses at every unpack.
    """

    __slots__ = ("packed", "compressor", "dtype", "raw", "nbytes", "counter", "saves", "reuse", "cached", "left",
                 "__weakref__")

    #: the holder whose ``"next"`` unpack waits for its next save (a weak reference), or None
    waiting: weakref.ref | None = None

    def __init__(self, packed, compressor, dtype, raw, nbytes, counter, reuse: str | bool = False):
        self.packed, self.compressor, self.dtype = packed, compressor, dtype
        self.raw, self.nbytes, self.counter = raw, nbytes, counter
        self.saves, self.reuse, self.cached, self.left = 1, reuse, None, 0

    def __del__(self) -> None:
        self.counter.release(self.raw, self.nbytes)

    def keep(self, tensor: torch.Tensor) -> None:
        """Hand ``tensor`` (just decompressed) to this holder's other saves, as ``reuse`` says;
        a ``"next"`` tensor of another holder still waiting is given up first."""
        waiting = _Saved.waiting() if _Saved.waiting is not None else None
        if waiting is not None and waiting is not self and waiting.reuse == "next":
            waiting.cached = None
        _Saved.waiting = None
        # saves still to serve: the rest of this round, or (all served: another backward, say
        # with retain_graph) a new round
        self.left = (self.left if self.left > 0 else self.saves) - 1
        if self.reuse and self.left > 0:
            self.cached = tensor
            if self.reuse == "next":
                _Saved.waiting = weakref.ref(self)


class _Seen:
    """A saved storage seen this step: alive-check plus one holder per compressor."""

    __slots__ = ("storage", "holders")

    def __init__(self, storage) -> None:
        self.storage = storage
        self.holders: dict[str | int, weakref.ref] = {}


class CompressionEngine:
    """Compresses the activations autograd saves in ``model``, following ``policy``.

    ``compressors`` maps compressor names to factories (``factory(**options) -> Compressor``);
    by default the installed ``slimfit_accel`` plugins provide them. ``swap_layernorm`` routes
    stock ``nn.LayerNorm`` and every RMSNorm (told by what it computes) through exact autograd
    functions that save the normalized output (what SlimFit compresses) instead of the input,
    and every gated MLP through one that saves its two projections' outputs only
    (``gated_mlp.py``).

    Example::

        engine = CompressionEngine(model, slimfit_policy()).attach()
        for batch in loader:
            with engine.step():
                loss = model(**batch).loss
                loss.backward()
            print(engine.stats.raw_bytes, engine.stats.packed_bytes)
        engine.detach()
    """

    def __init__(
        self,
        model: nn.Module,
        policy: CompressionPolicy | None = None,
        *,
        compressors: Mapping[str, Callable[..., Compressor]] | None = None,
        swap_layernorm: bool = True,
    ):
        self.model = model
        self.policy = policy if policy is not None else slimfit_policy()
        self.swap_layernorm = swap_layernorm
        self._context = ModuleContext(model)
        self._counter = ByteCounter()
        self._built: dict[tuple, Compressor] = {}
        self._choice: dict[tuple, tuple[str, Compressor]] = {}
        self._seen: dict[tuple, _Seen] = {}
        self._purge_at = 1024
        self._restore_layernorms: Callable[[], None] | None = None
        self._build_all(compressors)

    # ---------------------------------------------------------------- set-up
    def _build_all(self, factories: Mapping[str, Callable[..., Compressor]] | None) -> None:
        specs = [rule.compressor for rule in self.policy.rules] + [self.policy.default]
        if factories is None:
            from .registry import installed_compressor_factories

            factories = installed_compressor_factories()
        for spec in specs:
            if spec.key() in self._built:
                continue
            if spec.name not in factories:
                known = ", ".join(sorted(factories)) or "none installed"
                raise ConfigError(f"compression policy: unknown compressor '{spec.name}' (known: {known})")
            try:
                compressor = factories[spec.name](**spec.options)
            except (TypeError, ValueError) as exc:
                raise ConfigError(f"compression policy: compressor '{spec.name}' with options {spec.options}: {exc}") from exc
            if not (callable(getattr(compressor, "pack", None)) and callable(getattr(compressor, "unpack", None))):
                raise PluginError(spec.name, "the compressor factory returned an object without pack()/unpack()")
            self._built[spec.key()] = compressor

    def attach(self) -> "CompressionEngine":
        """Install the module-context hooks (and the norm swaps). Idempotent."""
        norms: list[nn.Module] = []
        if self.swap_layernorm and self._restore_layernorms is None:
            restore_layernorms = swap_layernorms(self.model)
            norms, restore_rmsnorms = swap_rmsnorms(self.model)
            _, restore_gated_mlps = swap_gated_mlps(self.model)

            def restore() -> None:
                restore_layernorms()
                restore_rmsnorms()
                restore_gated_mlps()

            self._restore_layernorms = restore
        self._context.attach(module_kinds(self.model, frozenset(map(id, norms))))
        return self

    def detach(self) -> None:
        """Remove every hook and swap ``attach`` made; saved tensors already packed stay valid."""
        self._context.detach()
        if self._restore_layernorms is not None:
            self._restore_layernorms()
            self._restore_layernorms = None

    @contextmanager
    def step(self) -> Iterator["CompressionEngine"]:
        """Compress saved tensors inside this block; starts a new set of step statistics.

        Backward may run inside or after the block: unpacking does not need the block.
        """
        self.new_step()
        with torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack):
            yield self

    def new_step(self) -> StepStats:
        """Start new step statistics and return those of the step that ended."""
        self._seen.clear()
        return self._counter.new_step()

    # ---------------------------------------------------------------- statistics
    @property
    def stats(self) -> StepStats:
        """Statistics of the current (or last) step; see :class:`StepStats`."""
        return self._counter.step

    @property
    def live_raw_bytes(self) -> int:
        return self._counter.live_raw

    @property
    def live_packed_bytes(self) -> int:
        return self._counter.live_packed

    # ---------------------------------------------------------------- hot path
    def compressor_for(self, ctx: SavedTensorContext) -> tuple[str, Compressor]:
        """The (name, compressor) the policy picks for a saved tensor (cached per module/role)."""
        key = (ctx.module_path, ctx.module_type, ctx.role, ctx.frozen)  # the kind follows from the path
        choice = self._choice.get(key)
        if choice is None:
            spec: CompressorSpec = self.policy.select(ctx)
            choice = self._choice[key] = (spec.name, self._built[spec.key()])
        return choice

    def _pack(self, tensor: torch.Tensor) -> Any:
        context = self._context
        if context.is_parameter(tensor):
            return tensor
        frame = context.current()
        role = tagged_role(tensor)
        if role is None and frame.input_ptr and tensor.data_ptr() == frame.input_ptr:
            role = "input"
        elif role is None and type(tensor.grad_fn).__name__ == "LogSoftmaxBackward0":
            role = "log_probs"  # a cross-entropy loss's log-softmax output
        if role != EXACT_ROLE and tensor.is_floating_point() and tensor.numel() >= self.policy.min_numel and tensor.dim() >= self.policy.min_ndim:
            ctx = SavedTensorContext(
                module_path=frame.path,
                module_type=frame.type_name,
                role=role,
                frozen=frame.frozen,
                dtype=tensor.dtype,
                shape=tuple(tensor.shape),
                module_kind=frame.kind,
            )
            name, compressor = self.compressor_for(ctx)
        else:
            ctx, name, compressor = None, KEPT, None

        seen, first = self._lookup(tensor)
        # one packed copy per compressor object (two specs may share a name: bitmask vs its sign mode)
        slot = id(compressor) if compressor is not None else name
        if seen is not None:
            ref = seen.holders.get(slot)
            holder = ref() if ref is not None else None
            if holder is not None:
                holder.saves += 1
                return holder

        packed = compressor.pack(tensor, ctx) if compressor is not None else tensor
        raw = tensor_bytes(tensor) if first else 0
        nbytes = packed_bytes(packed)
        holder = _Saved(packed, compressor, tensor.dtype, raw, nbytes, self._counter, reuse=_reuse(compressor, role, tensor))
        self._counter.add(name, raw, nbytes)
        if seen is not None:
            seen.holders[slot] = weakref.ref(holder)
        return holder

    def _lookup(self, tensor: torch.Tensor) -> tuple[_Seen | None, bool]:
        """The entry for this exact tensor view if seen alive this step; and whether it is new."""
        if StorageWeakRef is None:
            return None, True
        ptr = _storage_ptr(tensor)
        if not ptr:
            return None, True
        key = (ptr, tensor.storage_offset(), tuple(tensor.shape), tensor.stride(), tensor.dtype, tensor._version)
        seen = self._seen.get(key)
        if seen is not None and not seen.storage.expired():
            return seen, False
        if len(self._seen) >= self._purge_at:
            self._seen = {k: v for k, v in self._seen.items() if not v.storage.expired()}
            self._purge_at = max(1024, 2 * len(self._seen))
        seen = self._seen[key] = _Seen(StorageWeakRef(tensor.untyped_storage()))
        return seen, True

    @staticmethod
    def _unpack(saved: Any) -> torch.Tensor:
        if not isinstance(saved, _Saved):
            return saved
        if saved.compressor is None:
            return saved.packed
        tensor = saved.cached
        if tensor is not None:  # decompressed for another save of this holder: handed on, then dropped
            saved.left -= 1
            if saved.left <= 0:
                saved.cached = None
            return tensor
        tensor = saved.compressor.unpack(saved.packed)
        tensor = tensor if tensor.dtype == saved.dtype else tensor.to(saved.dtype)
        saved.keep(tensor)
        return tensor


def _reuse(compressor: Compressor | None, role: str | None, tensor: torch.Tensor) -> str | None:
    """How a holder's unpack serves its other saves (``_Saved``): none for a tensor kept as it is."""
    if compressor is None:
        return None
    return "all" if role == "log_probs" or tensor_bytes(tensor) <= KEEP_UNPACKED_BYTES else "next"


@contextmanager
def compressed_activations(
    model: nn.Module,
    policy: CompressionPolicy | None = None,
    *,
    compressors: Mapping[str, Callable[..., Compressor]] | None = None,
    swap_layernorm: bool = True,
) -> Iterator[CompressionEngine]:
    """Compress the activations saved by forward passes inside the block; no freezing needed.

    Backward may run after the block, except under gradient checkpointing: then run it inside.

    Example::

        with compressed_activations(model) as engine:      # SlimFit's default policy
            loss = model(**batch).loss
        loss.backward()                                    # unpacks as it goes
        print(engine.stats.raw_bytes, "->", engine.stats.packed_bytes)
    """
    engine = CompressionEngine(model, policy, compressors=compressors, swap_layernorm=swap_layernorm).attach()
    try:
        with engine.step():
            yield engine
    finally:
        engine.detach()
