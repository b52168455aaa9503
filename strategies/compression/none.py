"""``none``: keep the saved tensor as it is (what autograd does without slimfit-accel).

YAML: ``compressor: {name: none}``; also the policy's default for unmatched tensors.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from slimfit_accel.hookspecs import SavedTensorContext, hookimpl


@dataclass
class NoCompression:
    """Returns the tensor itself: no copy, no bytes saved, no error."""

    def pack(self, tensor: torch.Tensor, ctx: SavedTensorContext | None = None) -> torch.Tensor:
        return tensor

    def unpack(self, packed: torch.Tensor) -> torch.Tensor:
        return packed


@hookimpl
def register_compressors(register) -> None:
    register("none", NoCompression)
