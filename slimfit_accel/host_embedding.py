"""``input_embedding: host``: an input embedding the run never trains lives in host memory.

Why: a decoder's input embedding is vocabulary x hidden (12% of Llama-3-8B: 0.98 GiB in bf16,
125 MiB of a 536M decoder), yet a step reads only the rows of its batch's tokens. When the run
never trains it (the user froze it, or it is a unit the scheduler can never pick: ILS with a
parameter budget smaller than the matrix), the whole embedding module stays in host memory, the
lookup runs there and only the looked-up rows (batch x length x hidden) are copied to the
device. Exact: the same rows, in the same dtype; a frozen embedding sends no gradient back, so
nothing returns to the host in backward. Cost: one host lookup and one copy of the rows a
forward pass (16 MiB at 8 x 512 tokens of a 2048-wide bf16 model).

``host`` refuses, before training, an embedding it cannot move, with the reason: one the run
trains (always trained, schedulable and pickable, or trainable and not a unit), one tied to
another parameter (an LM head sharing the matrix reads all of it on the device), a model
without an ``nn.Embedding`` input embedding, and several processes, DeepSpeed or FSDP (they
place parameters themselves). ``auto`` moves it where it can and otherwise says why once and
leaves it on the device: what the planner's most memory-saving config uses.

The memory meter counts the moved parameters apart (``weights_host``, not in the device total),
like optimizer state paged to host. On a CPU run host and device are the same memory: the
figure is what a GPU run would hold on the device.

Example::

    slimfit = SlimFit.from_config({"scheduler": {"name": "ils", "freeze_ratio": 0.95}, "input_embedding": "host"})
"""

from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import nn

from .errors import IntegrationError
from .units import UnitSet

#: Attribute marking a parameter ``HostEmbedding`` keeps in host memory (the meter leaves it out
#: of ``params``; a set would compare tensors by value).
_MARK = "_slimfit_on_host"


def is_on_host(param: torch.Tensor) -> bool:
    """Whether ``param`` is a parameter ``input_embedding: host`` keeps in host memory."""
    return getattr(param, _MARK, False)


def why_not_on_host(model: nn.Module, units: UnitSet, never_trained: Mapping[str, str], accelerator: Any = None) -> str | None:
    """Why ``model``'s input embedding cannot live on host for this run, or None when it can."""
    getter = getattr(model, "get_input_embeddings", None)
    module = getter() if callable(getter) else None
    if not isinstance(module, nn.Embedding):
        return f"{type(model).__name__} has no nn.Embedding input embedding (get_input_embeddings)"
    if accelerator is not None:
        from accelerate.utils import DistributedType

        kind = accelerator.distributed_type
        if kind in (DistributedType.DEEPSPEED, DistributedType.FSDP) or accelerator.num_processes > 1:
            return f"it runs in one process without DeepSpeed or FSDP (this launch: {kind.value}, {accelerator.num_processes} process(es))"
    elif torch.distributed.is_available() and torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        return f"it runs in one process (a plain torch.distributed loop of {torch.distributed.get_world_size()} processes)"
    weight = module.weight
    names = [name for name, param in model.named_parameters(remove_duplicate=False) if param is weight]
    if len(names) > 1:
        return f"its weight is tied to {names[1]!r} (tie_word_embeddings), which reads the whole matrix on the device"
    holders = [unit for unit in units.all if any(param is weight for param in unit.params)]
    always = {unit.name for unit in units.always_trained}
    trained = [unit.name for unit in holders if unit.name in always or unit.name not in never_trained]
    if trained:
        return (f"this run trains it (unit {trained[0]!r}); it can live on host only when it never trains: freeze it "
                "(requires_grad=False before prepare_model) or raise the freeze ratio above its share of the parameters")
    if not holders and weight.requires_grad:
        return "it is trainable and not a SlimFit unit, so the optimizer trains it every step"
    return None


class HostEmbedding:
    """An embedding module in host memory, with hooks that look its rows up there and copy them
    to ``device`` (where the rest of the model is)."""

    def __init__(self, module: nn.Module, device: torch.device):
        self.module = module
        self.device = device
        self._handles = [
            module.register_forward_pre_hook(self._ids_to_host),
            module.register_forward_hook(self._rows_to_device),
        ]
        for param in module.parameters():
            setattr(param, _MARK, True)

    @classmethod
    def attach(cls, model: nn.Module) -> "HostEmbedding":
        """Move ``model``'s input embedding to host (after ``accelerator.prepare``; checked by
        ``why_not_on_host`` first)."""
        module = model.get_input_embeddings()
        store = cls(module, module.weight.device)
        module.to("cpu")
        return store

    def _ids_to_host(self, module: nn.Module, args: tuple) -> tuple:
        return tuple(a.to("cpu") if isinstance(a, torch.Tensor) else a for a in args)

    def _rows_to_device(self, module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        return output.to(self.device)

    def host_bytes(self) -> int:
        """Bytes of the parameters kept on host."""
        return sum(p.numel() * p.element_size() for p in self.module.parameters())

    def detach(self) -> None:
        """The embedding back on its device, hooks removed."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        for param in self.module.parameters():
            delattr(param, _MARK)
        self.module.to(self.device)


def refuse(reason: str) -> IntegrationError:
    """The error ``input_embedding: host`` raises when it cannot apply."""
    return IntegrationError(
        f"input_embedding: host cannot keep the input embedding in host memory: {reason}. Use input_embedding: auto "
        "(host where it can be, else on the device with a warning) or remove the key"
    )
