"""The reference the ``frozen_weights: int8`` tests compare with, written out plainly: a model
whose schedulable 2-D weights, at each step, are their exact masters when trained and the
dequantised int8 rounding of their masters (absmax per row, 127 levels) when frozen; the
optimizer steps the trained ones and their masters take the result. With ``mixed=True`` it is
``ReferenceMixedPrecision`` (bf16 model, fp32 masters) with the same substitution."""

from __future__ import annotations

import torch

from mixed_precision_reference import LR, WEIGHT_DECAY, ReferenceMixedPrecision


def int8_rounding(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes as int8, fp32 row scales): scale = max|row| / 127, codes = round(w / scale)."""
    w = weight.detach().float()
    scale = w.abs().amax(dim=1) / 127
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    return torch.round(w / safe[:, None]).clamp(-127, 127).to(torch.int8), scale


def dequantized(weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    codes, scale = int8_rounding(weight)
    return (codes.float() * scale[:, None]).to(dtype)


class ReferenceInt8:
    """``model`` trained by AdamW with ``stored`` (parameter names) held as exact masters; call
    ``prepare(trained)`` before each step's forward and ``step()`` after its backward."""

    def __init__(self, model: torch.nn.Module, stored: set[str], mixed: bool = False):
        self.mixed = ReferenceMixedPrecision(model) if mixed else None
        self.model = model
        self.stored = stored
        self.names = [name for name, _ in model.named_parameters()]
        if mixed:
            self.optimizer = self.mixed.optimizer
            self._masters = dict(zip(self.names, self.mixed.masters))
        else:
            self.optimizer = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=WEIGHT_DECAY)
            self._masters = {n: p.detach().clone() for n, p in model.named_parameters() if n in stored}
        self.trained: set[str] = set()

    def params(self) -> list[torch.nn.Parameter]:
        return list(getattr(self.model, "module", self.model).parameters())

    def master(self, name: str) -> torch.Tensor:
        """The exact value of ``name`` (fp32 master with ``mixed``)."""
        value = self._masters.get(name)
        if value is None:
            value = dict(zip(self.names, self.params()))[name]
        return value.detach()

    def prepare(self, trained: set[str]) -> None:
        self.trained = set(trained)
        for name, param in zip(self.names, self.params()):
            param.requires_grad_(name in trained)
            if name in self.stored:
                exact = self._masters[name].detach()
                param.data = exact.to(param.dtype, copy=True) if name in trained else dequantized(exact, param.dtype)

    def step(self) -> None:
        if self.mixed is not None:
            self.mixed.step()  # masters stepped, rounded into every weight
            return
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        for name, param in zip(self.names, self.params()):
            if name in self.stored and name in self.trained:
                self._masters[name] = param.detach().clone()
