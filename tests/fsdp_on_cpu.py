"""An Accelerate ``Accelerator`` running FSDP on CPU processes (gloo), for multi-process tests.

Accelerate selects FSDP only on accelerator devices (its state sets ``DistributedType.FSDP`` for
MULTI_GPU, MULTI_XPU, ...); on CPU it stays MULTI_CPU and ignores the plugin. torch's FSDP2
itself runs on CPU with gloo, so tests build a CPU accelerator and switch its state to FSDP:
everything after that (``prepare`` calling ``fully_shard``, ``backward``, ``save_state`` and
``load_state`` through torch.distributed.checkpoint) is Accelerate's own FSDP code.
"""

from __future__ import annotations

from typing import Any


def fsdp_accelerator(version: int = 2, gradient_accumulation_steps: int = 1, mixed_precision: str = "no", **plugin: Any):
    from accelerate import Accelerator
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin, InitProcessGroupKwargs

    from slimfit_accel import SlimFit

    accelerator = Accelerator(
        cpu=True, gradient_accumulation_steps=gradient_accumulation_steps, mixed_precision=mixed_precision,
        kwargs_handlers=[*SlimFit.kwargs_handlers(), InitProcessGroupKwargs(backend="gloo")],
    )
    fsdp_plugin = FullyShardedDataParallelPlugin(fsdp_version=version, **plugin)
    if mixed_precision != "no":
        fsdp_plugin.set_mixed_precision(mixed_precision)
    # AcceleratorState copies PartialState's type whenever it is built again: switch both.
    PartialState._shared_state["distributed_type"] = DistributedType.FSDP
    accelerator.state.distributed_type = DistributedType.FSDP
    accelerator.state.fsdp_plugin = fsdp_plugin
    return accelerator


def back_to_cpu() -> None:
    """Undo the switch, if made (the process group stays), so a next Accelerator in the process is
    MULTI_CPU."""
    from accelerate.state import AcceleratorState, GradientState, PartialState
    from accelerate.utils import DistributedType

    if PartialState._shared_state.get("distributed_type") == DistributedType.FSDP:
        PartialState._shared_state["distributed_type"] = DistributedType.MULTI_CPU
    AcceleratorState._reset_state()
    GradientState._reset_state()
