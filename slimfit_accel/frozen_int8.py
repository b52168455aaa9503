"""Frozen weights in 8 bits on the device (``frozen_weights: int8``).

A SlimFit step trains a fifth of the weights or less; the others only compute the forward pass and
pass input gradients back, which needs far less than their full precision. With this option
every schedulable 2-D weight (of an ``nn.Linear`` or ``nn.Embedding``; a tied input/output
embedding is one weight, stored once) holds on the device only int8 codes and one fp32 scale per
row (symmetric absmax: ``scale = max|row| / 127``, ``codes = round(w / scale)``), and its exact
value, the master, lives in host memory: with ``master_weights: host`` the fp32 master that module
keeps (``master_weights.py``), otherwise a host copy of the weight as loaded, in its dtype.

Each step (``FrozenInt8``):

- ``follow_requires_grad`` (``SlimFit.step``, once the step's decision is applied): each stored
  weight the step trains is materialised on the device from its master (with master weights: the
  master's bf16 rounding, the weight paging would hold) and is trained and stepped exactly as
  without this option; weights trained in the last step but not in this one are released.
- after the optimizer step (a step post-hook that runs after SlimFit's own): each materialised
  weight's host master takes the stepped value (without master weights; with them paging already
  wrote it), its codes and scales are requantised from the master and the full-precision device
  copy is freed. Between steps no full-precision copy of a stored weight is on the device.
- A frozen ``nn.Linear`` runs ``Int8Linear``: forward dequantises the weight, computes the output
  and drops it; backward dequantises it again for the input gradient (and sums the bias
  gradient). It holds the codes by reference only: no saved tensor, so neither the compression
  engine nor the meter sees one. A frozen ``nn.Embedding`` dequantises only the rows looked up; a
  frozen head under ``chunked_loss`` is dequantised inside the loss a slice of rows at a time
  (``chunked_loss.py``): a vocabulary-sized head is never whole in full precision. So no
  full-precision frozen weight outlives one layer's forward or backward.

Between steps a stored weight's ``.data`` is a placeholder: one NaN element expanded to the
weight's shape, in its dtype and on its device (so its gradient accumulator and DDP's hooks stay).
Code that reads such a weight directly instead of through its module gets NaN: loud, never a
silently wrong number. ``model.state_dict()`` gives the exact weights (from the masters, in host
memory); ``load_state_dict`` writes them into the masters and requantises; ``detach`` gives every
weight its full-precision value back from its master.

Memory: the meter (``memory.py``) counts a stored weight as its codes and scales (plus the full
copy while it trains, and the shared placeholder element once per dtype). Only ``nn.Linear`` and
``nn.Embedding`` weights (without ``max_norm``) whose forward is the class's own are stored; other
schedulable weights (transformers' ``Conv1D``, a module with a patched forward) stay in full
precision, said once at attach. Always-trained units are never stored.

Exact: a trained weight gets exactly the update it would get in a model whose frozen weights are
their dequantised codes (``dequantize(quantize(master))``) and whose trained weights are the
masters; frozen masters never change (``tests/test_frozen_int8.py``, one device and DDP).
One device or DDP; DeepSpeed ZeRO and FSDP own the parameters' storage and are refused.

Example (SlimFit does this for you with ``frozen_weights: int8``)::

    store = FrozenInt8.attach(model, units, masters=None)   # after accelerator.prepare
    store.follow_requires_grad()                             # each step, after the freeze decision
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable
from torch.utils.weak import WeakIdKeyDictionary

from .compression.swaps import bind_forward
from .errors import IntegrationError
from .host_embedding import is_on_host

if TYPE_CHECKING:
    from .master_weights import Master, MasterWeights
    from .units import UnitSet

#: Largest code; codes are symmetric in [-127, 127].
QMAX = 127
#: Rows quantised at once are bounded to about this many bytes of fp32 (bounded temporaries).
ROW_CHUNK_BYTES = 32 * 2**20

_STORED: WeakIdKeyDictionary = WeakIdKeyDictionary()  # parameter -> its StoredWeight


# ------------------------------------------------------------------------------ the format
def rows_per_slice(matrix: torch.Tensor) -> int:
    """Rows of ``matrix`` whose fp32 copy fits ``ROW_CHUNK_BYTES`` (at least one): the slice every
    quantise / dequantise loop here works on, so its temporaries stay bounded."""
    if not matrix.shape[0]:
        return 1
    return max(1, ROW_CHUNK_BYTES // max(1, 4 * matrix[0].numel()))


def quantize_into(codes: torch.Tensor, scales: torch.Tensor, source: torch.Tensor) -> None:
    """Write ``source``'s int8 codes and per-row fp32 scales into ``codes`` and ``scales`` (on
    their device), a bounded slice of rows at a time. ``source`` may live on host."""
    rows = source.shape[0]
    per = rows_per_slice(source)
    with torch.no_grad():
        for start in range(0, rows, per):
            block = source[start:start + per].to(codes.device, torch.float32)
            absmax = block.abs().amax(dim=1)
            scale = absmax / QMAX
            divisor = torch.where(scale > 0, scale, torch.ones_like(scale))  # an all-zero row: codes 0
            codes[start:start + per] = torch.round(block / divisor[:, None]).clamp_(-QMAX, QMAX).to(torch.int8)
            scales[start:start + per] = scale


def quantize(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 codes, fp32 per-row scales) of a 2-D ``weight``, on its device."""
    codes = torch.empty(weight.shape, dtype=torch.int8, device=weight.device)
    scales = torch.empty(weight.shape[0], dtype=torch.float32, device=weight.device)
    quantize_into(codes, scales, weight)
    return codes, scales


def dequantize(codes: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``codes * scale`` per row, computed in fp32 and cast to ``dtype``, a bounded slice of rows at
    a time (the fp32 temporary is at most ``ROW_CHUNK_BYTES``, not the whole matrix's)."""
    out = torch.empty(codes.shape, dtype=dtype, device=codes.device)
    per = rows_per_slice(codes)
    for start in range(0, codes.shape[0], per):
        out[start:start + per] = codes[start:start + per].to(torch.float32) * scales[start:start + per, None]
    return out


# ------------------------------------------------------------------------------ one weight
@dataclass(eq=False)
class StoredWeight:
    """One weight kept as int8 codes on the device: ``codes``, ``scales``; its exact value in
    ``host`` (without master weights) or ``master.host`` (fp32); ``materialised`` while it trains."""

    name: str
    param: nn.Parameter
    codes: torch.Tensor
    scales: torch.Tensor
    placeholder: torch.Tensor  # the NaN element every placeholder of this dtype and device expands
    host: torch.Tensor | None = None
    master: "Master | None" = None
    materialised: bool = False
    owners: list[tuple[nn.Module, str]] = field(default_factory=list)

    @property
    def exact(self) -> torch.Tensor:
        """The exact weight, in host memory (fp32 with master weights, else the weight's dtype)."""
        return self.master.host if self.master is not None else self.host

    def dequantize(self) -> torch.Tensor:
        """The whole weight from its codes, in the parameter's dtype, on the device."""
        return dequantize(self.codes, self.scales, self.param.dtype)

    def row_slices(self):
        """``(first row, rows)`` pairs covering the weight: each slice dequantised in the
        parameter's dtype, at most ``ROW_CHUNK_BYTES`` of fp32 rows at once (a whole weight when it
        is smaller), so a large frozen head is never dequantised whole (``chunked_loss.py``)."""
        rows = self.codes.shape[0]
        per = rows_per_slice(self.codes)
        if per >= rows:
            yield 0, self.dequantize()
            return
        for start in range(0, rows, per):
            yield start, (self.codes[start:start + per].to(torch.float32) * self.scales[start:start + per, None]).to(self.param.dtype)

    def rows(self, index: torch.Tensor) -> torch.Tensor:
        """``dequantize()[index]`` without dequantising the other rows (an embedding lookup)."""
        return (self.codes[index].to(torch.float32) * self.scales[index].unsqueeze(-1)).to(self.param.dtype)

    def device_tensors(self) -> list[torch.Tensor]:
        """What this weight holds on the device: codes, scales, and the full copy while it trains
        (else the shared placeholder element)."""
        return [self.codes, self.scales, self.param.data if self.materialised else self.placeholder]

    def materialise(self) -> None:
        full = torch.empty(self.param.shape, dtype=self.param.dtype, device=self.param.device)
        full.copy_(self.exact)  # with master weights: rounded to bf16 as paging rounds it
        self.param.data = full
        self.materialised = True

    def release(self) -> None:
        """Master updated from the trained weight (without master weights), codes requantised
        from the master, the full copy freed."""
        if self.materialised:
            if self.master is None:
                self.host.copy_(self.param.data)
                quantize_into(self.codes, self.scales, self.param.data)
            else:
                quantize_into(self.codes, self.scales, self.master.host)
        self.param.data = self.placeholder.expand(self.param.shape)
        self.materialised = False

    def requantize(self) -> None:
        """Codes from the master as it is now (after a checkpoint was loaded into it)."""
        quantize_into(self.codes, self.scales, self.exact)

    def restore(self) -> None:
        """The parameter in full precision again, from its master (when detaching)."""
        if not self.materialised:
            self.materialise()
        self.materialised = False


def stored_weight(param: torch.Tensor) -> StoredWeight | None:
    """The int8 store of ``param``, or None when it is not stored."""
    return _STORED.get(param)


def device_tensors(param: torch.Tensor) -> list[torch.Tensor] | None:
    """The tensors ``param`` holds on the device when it is stored in int8, else None (for the meter)."""
    stored = _STORED.get(param)
    return stored.device_tensors() if stored is not None else None


def requantize_from_master(param: torch.Tensor) -> bool:
    """After a master was loaded (``MasterWeights.load_master``): requantise a stored weight that
    is not materialised and return True; False when the caller should round the master into the
    parameter as usual."""
    stored = _STORED.get(param)
    if stored is None or stored.materialised:
        return False
    stored.requantize()
    return True


# ------------------------------------------------------------------------------ frozen compute
class Int8Linear(torch.autograd.Function):
    """``F.linear(x, dequantize(codes), bias)`` for a frozen weight: the weight is made in forward
    and again in backward (for the input gradient) and never saved; autocast's casts are repeated
    explicitly in backward, so the gradients are autograd's for a linear of that weight."""

    @staticmethod
    def forward(ctx, x, bias, stored):  # noqa: D102
        out = F.linear(x, stored.dequantize(), bias)  # autocast applies here
        ctx.stored, ctx.compute_dtype = stored, out.dtype
        ctx.x_dtype, ctx.x_shape = x.dtype, x.shape
        ctx.bias_dtype = bias.dtype if bias is not None else None
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):  # noqa: D102
        need_x, need_bias = ctx.needs_input_grad[:2]
        grad_x = grad_bias = None
        flat = grad_out.reshape(-1, grad_out.shape[-1])
        with torch.autocast(grad_out.device.type, enabled=False):
            if need_x:
                weight = ctx.stored.dequantize().to(ctx.compute_dtype)
                grad_x = flat.mm(weight).view(ctx.x_shape).to(ctx.x_dtype)
                del weight
            if need_bias:
                grad_bias = flat.sum(0).to(ctx.bias_dtype)
        return grad_x, grad_bias, None


def linear_forward(module: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """``module``'s forward: through ``Int8Linear`` while its weight is stored and frozen."""
    stored = _STORED.get(module.weight)
    if stored is None or stored.materialised:
        return nn.Linear.forward(module, x)
    return Int8Linear.apply(x, module.bias, stored)


def embedding_forward(module: nn.Embedding, ids: torch.Tensor) -> torch.Tensor:
    """``module``'s forward: the rows looked up, dequantised, while its weight is stored and frozen
    (a frozen embedding has no gradient to compute)."""
    stored = _STORED.get(module.weight)
    if stored is None or stored.materialised:
        return nn.Embedding.forward(module, ids)
    return stored.rows(ids)


def head_weight(weight: torch.Tensor) -> Any:
    """What a loss computed from a head's weight should use (``chunked_loss.py``): the weight
    itself, or its ``StoredWeight`` while it is stored and frozen (dequantise it, never save it)."""
    stored = _STORED.get(weight)
    return stored if stored is not None and not stored.materialised else weight


_FORWARDS = {nn.Linear: (nn.Linear.forward, linear_forward), nn.Embedding: (nn.Embedding.forward, embedding_forward)}


def _why_not_stored(module: nn.Module, name: str) -> str | None:
    """None when ``module``'s parameter ``name`` can be kept in int8 through its forward; else why not."""
    if name != "weight":
        return f"it is {type(module).__name__}.{name}"
    for cls, (original, _) in _FORWARDS.items():
        if isinstance(module, cls) and type(module).forward is original:
            if isinstance(module, nn.Embedding) and module.max_norm is not None:
                return "an nn.Embedding with max_norm renormalises its weight in forward"
            patched = "forward" in module.__dict__ and getattr(module, "_slimfit_chunked_loss", None) is None
            return f"{type(module).__name__} has a forward patched on the instance" if patched else None
    return f"it belongs to a {type(module).__name__} (only nn.Linear and nn.Embedding weights are stored)"


# ------------------------------------------------------------------------------ the store
class FrozenInt8:
    """The int8 device copies of a model's schedulable 2-D weights; see the module docstring."""

    def __init__(self) -> None:
        self.weights: list[StoredWeight] = []
        self.kept: dict[str, str] = {}  # name -> why it stays in full precision
        self._handles: list[Any] = []
        self._patched: list[nn.Module] = []
        self._loaded_keys: set[str] = set()
        self._bases: dict[tuple, torch.Tensor] = {}  # (dtype, device) -> the NaN element placeholders expand

    @classmethod
    def attach(
        cls, model: nn.Module, units: "UnitSet", masters: "MasterWeights | None" = None,
        optimizer: torch.optim.Optimizer | None = None, pin: bool | None = None,
    ) -> "FrozenInt8":
        """Store ``model``'s schedulable 2-D weights in int8 (``model`` unwrapped, on its device,
        after ``accelerator.prepare``). ``masters``: the fp32 masters of ``master_weights: host``
        (the exact values); without them a host copy of each weight is made. ``optimizer``: its
        steps release the trained weights (a step post-hook, registered last)."""
        store = cls()
        always = {id(p) for u in units.always_trained for p in u.params}
        owners: dict[int, list[tuple[nn.Module, str]]] = {}
        for module in model.modules():
            for name, param in module._parameters.items():
                if param is not None:
                    owners.setdefault(id(param), []).append((module, name))
        seen: set[int] = set()
        names = {id(p): n for n, p in model.named_parameters()}
        for unit in units.schedulable:
            for param in unit.params:
                if id(param) in seen or id(param) in always or param.dim() != 2 or not param.is_floating_point():
                    continue
                if is_on_host(param):  # input_embedding: host: nothing of it on the device to shrink
                    continue
                seen.add(id(param))
                name = names.get(id(param), unit.name)
                why = [w for m, n in owners.get(id(param), []) if (w := _why_not_stored(m, n))]
                if why:
                    store.kept[name] = why[0]
                    continue
                master = masters.of(param) if masters is not None else None
                if masters is not None and master is None:
                    raise IntegrationError(
                        f"frozen_weights: int8 found no fp32 master for {name!r} under master_weights: host; make it "
                        "trainable before slimfit.prepare_model"
                    )
                store._store(name, param, owners[id(param)], master, pin)
        if store.kept:
            example, reason = next(iter(store.kept.items()))
            warnings.warn(
                f"frozen_weights: int8 keeps {len(store.kept)} schedulable weight(s) in full precision (e.g. "
                f"{example!r}: {reason})", stacklevel=3,
            )
        store._install(optimizer)
        return store

    def _store(self, name: str, param: nn.Parameter, owners: list, master: "Master | None", pin: bool | None) -> None:
        pin = param.is_cuda if pin is None else pin
        host = None
        if master is None:
            host = torch.empty(param.shape, dtype=param.dtype, pin_memory=pin)
            host.copy_(param.detach())
        codes = torch.empty(param.shape, dtype=torch.int8, device=param.device)
        scales = torch.empty(param.shape[0], dtype=torch.float32, device=param.device)
        stored = StoredWeight(name, param, codes, scales, self._placeholder(param), host=host, master=master,
                              owners=list(owners))
        stored.requantize()
        stored.release()
        _STORED[param] = stored
        self.weights.append(stored)

    def _placeholder(self, param: torch.Tensor) -> torch.Tensor:
        key = (param.dtype, param.device)
        if key not in self._bases:
            self._bases[key] = torch.full((), float("nan"), dtype=param.dtype, device=param.device)
        return self._bases[key]

    def _install(self, optimizer: torch.optim.Optimizer | None) -> None:
        for stored in self.weights:
            for module, name in stored.owners:
                if module not in self._patched and getattr(module, "_slimfit_chunked_loss", None) is None:
                    forward = next(f for cls, (_, f) in _FORWARDS.items() if isinstance(module, cls))
                    module.forward = bind_forward(module, forward)
                    self._patched.append(module)
                self._handles += [
                    module.register_state_dict_post_hook(self._state_dict_hook(stored, name)),
                    module.register_load_state_dict_pre_hook(self._load_hook(stored, name)),
                    module.register_load_state_dict_post_hook(self._load_done),
                ]
        if optimizer is not None:
            self._handles.append(optimizer.register_step_post_hook(lambda *_: self.release_all()))

    # ---------------------------------------------------------------- per step
    def follow_requires_grad(self) -> None:
        """Materialise the stored weights that train now (``requires_grad``), release the others."""
        for stored in self.weights:
            if stored.materialised and not stored.param.requires_grad:
                stored.release()
        for stored in self.weights:
            if not stored.materialised and stored.param.requires_grad:
                stored.materialise()

    def release_all(self) -> None:
        """After an optimizer step: every trained weight back to int8 (see ``StoredWeight.release``)."""
        for stored in self.weights:
            if stored.materialised:
                stored.release()

    def host_bytes(self) -> int:
        """Bytes of the host copies this store made (0 with master weights: those are the masters)."""
        return sum(s.host.numel() * s.host.element_size() for s in self.weights if s.host is not None)

    def device_bytes(self) -> int:
        """Bytes of codes and scales on the device."""
        return sum(s.codes.numel() + s.scales.numel() * 4 for s in self.weights)

    def detach(self) -> None:
        """Every stored weight in full precision again (from its master); hooks and forwards removed."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        for module in self._patched:
            module.__dict__.pop("forward", None)
        self._patched = []
        for stored in self.weights:
            stored.restore()
            _STORED.pop(stored.param, None)
        self.weights = []

    # ---------------------------------------------------------------- checkpoints
    def _state_dict_hook(self, stored: StoredWeight, name: str):
        def hook(module, state_dict, prefix, local_metadata):
            key = prefix + name
            if key in state_dict and not stored.materialised:
                state_dict[key] = stored.exact.to(stored.param.dtype, copy=stored.master is not None)
        return hook

    def _load_hook(self, stored: StoredWeight, name: str):
        def hook(module, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
            key = prefix + name
            if key not in state_dict or stored.materialised:
                return  # missing: torch reports it; materialised: loaded into the weight as usual
            value = state_dict.pop(key)
            if tuple(value.shape) != tuple(stored.param.shape):
                error_msgs.append(
                    f"size mismatch for {key}: copying a param with shape {tuple(value.shape)} from checkpoint, "
                    f"the shape in current model is {tuple(stored.param.shape)}."
                )
                return
            with torch.no_grad():
                stored.exact.copy_(value)
            stored.requantize()
            self._loaded_keys.add(key)
        return hook

    def _load_done(self, module, incompatible_keys) -> None:
        """Keys this store loaded itself are not missing (torch saw no value for them)."""
        missing = incompatible_keys.missing_keys
        missing[:] = [key for key in missing if key not in self._loaded_keys]


def refuse_unsupported(accelerator: Any, sharding: int | None) -> None:
    """One line for setups whose engine owns the parameters' storage (before anything changes)."""
    from accelerate.utils import DistributedType

    if accelerator is not None and accelerator.distributed_type == DistributedType.DEEPSPEED:
        raise IntegrationError(
            "frozen_weights: int8 replaces frozen weights' device storage with int8 codes, but DeepSpeed ZeRO owns "
            "the parameters' storage (flat bf16/fp32 partitions): remove frozen_weights from the SlimFit config, or "
            "train under DDP"
        )
    if sharding:
        raise IntegrationError(
            f"frozen_weights: int8 replaces frozen weights' device storage with int8 codes, but FSDP{sharding} owns "
            "the parameters' storage (sharded DTensors): remove frozen_weights from the SlimFit config, or train "
            "under DDP"
        )
