"""Randomness that every rank agrees on: generators derived from (seed, key...)."""

from __future__ import annotations

import hashlib

import torch


def derived_generator(seed: int, *keys: int) -> torch.Generator:
    """A CPU generator seeded from ``seed`` and integer ``keys`` (e.g. the step).

    The same arguments give the same stream on every rank and after a resume; different keys
    give unrelated streams (hashed, not ``seed + step``, so neighbouring seeds do not overlap).
    """
    digest = hashlib.blake2b(repr((seed, *keys)).encode(), digest_size=8).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest, "little") & (2**63 - 1))
