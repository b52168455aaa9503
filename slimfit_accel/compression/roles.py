"""Role tags: a way for code that saves a tensor to say what it is (``normalized``, ``rstd``).

Tags are keyed by tensor identity and vanish with the tensor, so tagging costs nothing to undo.
"""

from __future__ import annotations

import torch
from torch.utils.weak import WeakIdKeyDictionary

_ROLES: WeakIdKeyDictionary = WeakIdKeyDictionary()

#: A tensor that must come back bit for bit whatever the policy says (a gradient computed in
#: forward, e.g. the chunked loss's): the engine keeps it as it is and counts its bytes.
EXACT_ROLE = "exact"


def tag_role(tensor: torch.Tensor, role: str) -> None:
    """Mark ``tensor`` with ``role`` for the compression policy (call before it is saved)."""
    _ROLES[tensor] = role


def tagged_role(tensor: torch.Tensor) -> str | None:
    """The role ``tensor`` was tagged with, or None."""
    return _ROLES.get(tensor)
