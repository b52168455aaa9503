"""bf16 weights on the device, their fp32 masters in host memory (``master_weights: host``).

Mixed precision as LLMs are trained: the model computes with bf16 weights and the optimizer
updates fp32 master copies, each update rounded back into the bf16 weight. SlimFit keeps the
masters where optimizer paging keeps the optimizer state, in host memory (pinned when CUDA is
present), and streams both through the optimizer step chunk by chunk (``paging.py``):

- ``MasterWeights.cast_model`` (from ``SlimFit.prepare_model``, before ``accelerator.prepare``)
  copies every trainable floating parameter to fp32 host memory, so a master starts as the
  loaded weight and not its bf16 rounding, then casts every floating parameter to bf16 in place
  (``param.data``: the Parameter objects, the units and the optimizer built later keep their
  identity). Parameters the user froze become bf16 and get no master.
- In the step, a chunk's masters are copied to the device and stepped in the parameters' place:
  the optimizer's own update runs on the master with the fp32 cast of the bf16 gradient, the
  master is rounded into the parameter's own bf16 storage and copied back to host. The optimizer
  state is therefore fp32, created against the master. Frozen units never have an fp32 copy on
  the device. (The parameter itself never changes dtype: ``param.data`` of another dtype would
  drop its gradient accumulator, and with it the hooks DDP reduces gradients with.)
- Checkpoints: the optimizer's ``state_dict`` carries the masters (key ``master_weights``:
  parameter index -> fp32 tensor, the indices torch uses for the state); its ``load_state_dict``
  restores them and keeps the state fp32 (torch would cast it to the bf16 parameter's dtype).
- ``restore`` (from ``SlimFit.detach``) gives every parameter its fp32 master back, on its
  device: the model and the optimizer are then as plain fp32 training leaves them.

Exact: weights, masters and optimizer state are bit-identical to a reference mixed-precision
loop (fp32 masters stepped by the same optimizer, bf16 model, master rounded into it after
each step). Under DeepSpeed, bf16 already keeps fp32 masters in DeepSpeed's optimizer; SlimFit
then releases its own (see ``SlimFit.attach``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import torch
from torch import nn

from .errors import IntegrationError

#: The dtype the device copy of each weight is kept in.
DEVICE_DTYPE = torch.bfloat16


@dataclass
class Master:
    """One parameter's fp32 master: ``host`` in host memory, ``param`` the bf16 device weight."""

    name: str
    param: nn.Parameter
    host: torch.Tensor


class MasterWeights:
    """fp32 host copies of the trained parameters of a bf16 model; see the module docstring.

    Example (on its own; SlimFit's ``master_weights: host`` does this for you)::

        masters = MasterWeights.cast_model(model)        # model now bf16, masters on host
        paging = OptimizerPaging(optimizer, masters=masters).install()
    """

    def __init__(self, pin: bool | None = None):
        self.pin = torch.cuda.is_available() if pin is None else pin
        self._by_param: dict[int, Master] = {}

    @classmethod
    def cast_model(cls, model: nn.Module, pin: bool | None = None) -> "MasterWeights":
        """Masters of ``model``'s trainable parameters, then every floating parameter in bf16.

        Call before the model is wrapped (DDP records its parameters' dtype) and before the
        optimizer is built. Raises for float64 parameters, which an fp32 master would round.
        """
        masters = cls(pin)
        named = [(name, p) for name, p in model.named_parameters() if p.is_floating_point()]
        wide = [name for name, p in named if p.element_size() > 4]
        if wide:
            raise IntegrationError(
                f"master_weights: host keeps fp32 masters, but parameter {wide[0]!r} is "
                f"{dict(named)[wide[0]].dtype}; load the model in float32 (or bf16)."
            )
        for name, param in named:
            if param.requires_grad:
                host = torch.empty(param.shape, dtype=torch.float32, pin_memory=masters.pin)
                host.copy_(param.detach())
                masters._by_param[id(param)] = Master(name, param, host)
            param.data = param.data.to(DEVICE_DTYPE)
        return masters

    def __len__(self) -> int:
        return len(self._by_param)

    def __iter__(self) -> Iterator[Master]:
        return iter(list(self._by_param.values()))

    def of(self, param: torch.Tensor) -> Master | None:
        """``param``'s master, or None when it has none."""
        return self._by_param.get(id(param))

    def host_bytes(self) -> int:
        """Bytes the masters take in host memory."""
        return sum(m.host.numel() * m.host.element_size() for m in self._by_param.values())

    def keep_only(self, params: list[torch.Tensor]) -> None:
        """Release the masters of parameters not in ``params`` (not in the optimizer: never stepped)."""
        keep = {id(p) for p in params}
        self._by_param = {key: master for key, master in self._by_param.items() if key in keep}

    def release(self) -> None:
        """Drop every master (the device weights stay bf16)."""
        self._by_param = {}

    def broadcast(self, src: int = 0) -> None:
        """Every rank takes rank ``src``'s masters, as DDP takes its weights when it wraps the
        model: ranks that built different fp32 weights then still train the same masters."""
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return
        nccl = dist.get_backend() == "nccl"
        for master in self._by_param.values():
            if nccl:  # NCCL broadcasts device tensors: one master at a time through the device
                resident = master.host.to(master.param.device)
                dist.broadcast(resident, src)
                master.host.copy_(resident)
            else:
                dist.broadcast(master.host, src)

    def load_master(self, master: Master, value: torch.Tensor) -> None:
        """Set a master from a checkpoint and round it into its device weight."""
        if tuple(value.shape) != tuple(master.host.shape):
            raise IntegrationError(
                f"checkpoint master weight for {master.name!r} has shape {tuple(value.shape)}, the model's is "
                f"{tuple(master.host.shape)}: load a checkpoint of this model."
            )
        master.host.copy_(value)
        from .frozen_int8 import requantize_from_master

        if not requantize_from_master(master.param):  # frozen_weights: int8 holds codes, no weight to round into
            with torch.no_grad():
                master.param.copy_(master.host)

    def restore(self) -> None:
        """Every parameter with a master becomes its fp32 master again, on its device; then the
        masters are released."""
        for master in self._by_param.values():
            master.param.data = master.host.to(master.param.device, copy=True)
        self.release()


def check_precision(accelerator) -> None:
    """Refuse an Accelerator in fp16: its GradScaler would scale a bf16 model's gradients and
    its autocast compute in fp16. bf16 autocast (``mixed_precision='bf16'``) or none both work."""
    if accelerator is not None and getattr(accelerator, "mixed_precision", "no") == "fp16":
        raise IntegrationError(
            "master_weights: host trains a bf16 model, but the Accelerator runs mixed_precision='fp16'. "
            "Use mixed_precision='bf16' (or 'no')."
        )


DEEPSPEED_NO_OP = (
    "master_weights: host has no effect under DeepSpeed: with bf16 enabled, DeepSpeed's optimizer already keeps "
    "the fp32 master weights (in its partitions, one per rank; on host with offload_optimizer) and DeepSpeed casts "
    "the model to bf16 as SlimFit did, so SlimFit released its host copies and holds nothing twice."
)


def hand_over_to_deepspeed(masters: MasterWeights, engine) -> None:
    """Under DeepSpeed: its bf16 mode keeps fp32 masters (made from the bf16 weights, as it casts
    the model itself) and the state in its optimizer, so SlimFit drops its copies (a warned
    no-op). DeepSpeed without bf16 would step the bf16 model as is, or cast it to fp16: refused."""
    import warnings

    if not engine.bfloat16_enabled():
        raise IntegrationError(
            "master_weights: host made the model bf16, but the DeepSpeed config does not enable bf16 "
            "(set \"bf16\": {\"enabled\": true}, or mixed_precision='bf16' in Accelerate), so DeepSpeed would "
            "keep no fp32 masters. Enable bf16, or remove master_weights."
        )
    masters.release()
    warnings.warn(DEEPSPEED_NO_OP, stacklevel=4)
