"""PyTorch FSDP under SlimFit: FSDP2 (``fully_shard``, Accelerate's ``fsdp_version: 2``) is
supported, FSDP1 (``FullyShardedDataParallel``) is refused at ``attach``.

FSDP2 keeps each parameter as a ``DTensor`` holding this rank's shard, and the optimizer steps
those shards. Freezing works as for a plain torch optimizer (``TorchStepBackend``): in forward
FSDP2 gives each module an unsharded parameter whose ``requires_grad`` it copies from the
sharded one at every all-gather, so a frozen unit gets no gradient, FSDP2 leaves it out of the
reduce-scatter, and the optimizer skips it (gradient None). Three things differ, handled here:

- ``fully_shard`` replaces every parameter object, so the units found by ``prepare_model``
  (before ``accelerator.prepare``) are pointed at the sharded parameters, by name;
- FSDP2 fixes each parameter group's gradient dtypes at its lazy init, from the parameters that
  require grad at that moment (normally the first forward, when most units are frozen): a group
  frozen then would, once trained, reduce its gradients in the wrong dtype (under mixed
  precision torch raises mid-training). SlimFit runs that init at ``attach``, with every unit
  trainable;
- scorers and the memory meter see this rank's shards (plain tensors), as under ZeRO: the
  controller combines the ranks' per-unit means weighted by element count.

FSDP1 flattens each wrapped module's tensors into one ``FlatParameter`` with one
``requires_grad`` flag, computes and reduces gradients for it as a whole, and (with
``use_orig_params``) hands the original tensors their gradient slices on its own schedule: a
tensor cannot be frozen on its own for one step, so FSDP1 is refused.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import nn

from ..errors import IntegrationError
from ..hookspecs import UnitView
from ..stepping import TorchStepBackend, UnitParams
from ..units import Unit, UnitSet

FSDP1_REFUSAL = (
    "FSDP1 (FullyShardedDataParallel, Accelerate's fsdp_version: 1) is not supported by SlimFit: "
    "it flattens each wrapped module's tensors into one FlatParameter, so one tensor cannot be frozen per step. "
    "Use FSDP2: fsdp_version: 2 in the "
    "Accelerate config (e.g. accelerate_configs/fsdp2.yaml) or FullyShardedDataParallelPlugin(fsdp_version=2)."
)


def fsdp_version(accelerator: Any, model: nn.Module) -> int | None:
    """1 or 2 if ``model`` runs under FSDP1 or FSDP2 (through Accelerate or wrapped by hand), else None."""
    from accelerate.utils import DistributedType

    if accelerator is not None and accelerator.distributed_type == DistributedType.FSDP:
        return 2 if accelerator.is_fsdp2 else 1
    from torch.distributed.fsdp import FullyShardedDataParallel

    modules = list(model.modules())
    if any(isinstance(m, FullyShardedDataParallel) for m in modules):
        return 1
    fsdp_module = _fsdp2_module_class()
    if fsdp_module is not None and any(isinstance(m, fsdp_module) for m in modules):
        return 2
    return None


def is_dtensor(tensor: Any) -> bool:
    dtensor = _dtensor_class()
    return dtensor is not None and isinstance(tensor, dtensor)


def local_shard(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's part of ``tensor``: a DTensor's local shard (FSDP2), else ``tensor`` itself.
    The shard shares the DTensor's memory, so an in-place update of one shows in the other."""
    if is_dtensor(tensor):
        with torch.no_grad():
            return tensor.to_local()
    return tensor


def rebind_units(units: UnitSet, model: nn.Module) -> UnitSet:
    """``units`` with each parameter replaced by ``model``'s parameter of the same name.

    ``fully_shard`` (and Accelerate's FSDP2 preparation) swaps every parameter for a new
    ``DTensor`` one; the units found before must follow, or freezing would flip
    ``requires_grad`` on parameters nobody trains. Names are compared as Accelerate maps them
    (activation-checkpoint and ``torch.compile`` wrappers left out).
    """
    from accelerate.utils.fsdp_utils import fsdp2_canonicalize_names

    current = fsdp2_canonicalize_names(dict(model.named_parameters()))

    def rebound(unit: Unit) -> Unit:
        missing = [name for name in unit.param_names if name not in current]
        if missing:
            raise IntegrationError(
                f"unit parameter {missing[0]!r} is not in the prepared model: call slimfit.prepare_model(model) "
                f"on the same model that goes to accelerator.prepare."
            )
        params = tuple(current[name] for name in unit.param_names)
        if all(new is old for new, old in zip(params, unit.params)):
            return unit
        return Unit(name=unit.name, params=params, param_names=unit.param_names, index=unit.index, block=unit.block)

    return UnitSet(
        schedulable=tuple(rebound(u) for u in units.schedulable),
        always_trained=tuple(rebound(u) for u in units.always_trained),
    )


def init_fsdp2(model: nn.Module) -> None:
    """Run FSDP2's lazy init now, while every unit is trainable (see the module docstring).

    Idempotent: a root that has run a forward already (with every unit trainable, as
    ``prepare_model`` leaves them) keeps its init. Raises ``IntegrationError`` if this torch's
    FSDP2 has no lazy init to run.
    """
    fsdp_module = _fsdp2_module_class()
    root = next((m for m in model.modules() if isinstance(m, fsdp_module)), None) if fsdp_module else None
    if root is None:
        return
    state = root._get_fsdp_state()  # noqa: SLF001 (FSDP2 has no public lazy init)
    lazy_init = getattr(state, "_lazy_init", None)
    if lazy_init is None:
        raise IntegrationError(
            f"this torch ({torch.__version__}) has no FSDP2 lazy init for SlimFit to run before training; "
            "use torch >= 2.6."
        )
    lazy_init()


class FSDP2StepBackend(TorchStepBackend):
    """Freeze-true stepping under FSDP2: ``TorchStepBackend`` (frozen gradients dropped before the
    optimizer's step) with views of this rank's shards.

    Example::

        backend = FSDP2StepBackend(optimizer)   # optimizer over the fully_shard model's parameters
        backend.install(before_step=lambda: ..., after_step=lambda: ...)
    """

    def views(self, units: Sequence[UnitParams]) -> list[UnitView]:
        return [
            UnitView(
                name=name,
                weights=[local_shard(p.detach()) for p in params],
                grads=[None if p.grad is None else local_shard(p.grad.detach()) for p in params],
            )
            for name, params in units
        ]


def _fsdp2_module_class():
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # torch < 2.6
        return None
    return FSDPModule


def _dtensor_class():
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch < 2.4
        return None
    return DTensor
