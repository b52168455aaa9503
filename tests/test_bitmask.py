"""``bitmask``: dropout masks stored exactly in one bit an element; other tensors untouched."""

from __future__ import annotations

import pytest
import torch

from slimfit_accel.compression.accounting import packed_bytes
from slimfit_accel.strategies.compression.bitmask import Bitmask


def dropout_mask(shape, dtype=torch.float32, p=0.1):
    saved = []
    x = torch.randn(shape, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        torch.nn.functional.dropout(x.to(dtype) * 1.0, p, True)
    return saved[-1]


@pytest.mark.parametrize("shape", [(4, 8), (3, 5, 7), (1,), (13,)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dropout_mask_round_trip_is_exact_and_one_bit(shape, dtype):
    mask = dropout_mask(shape, dtype)
    packed = Bitmask().pack(mask)
    assert torch.equal(Bitmask().unpack(packed), mask)
    numel = mask.numel()
    assert packed_bytes(packed) == (numel + 7) // 8 + mask.element_size()


def test_bool_and_all_zero_masks():
    mask = torch.rand(5, 9) > 0.3
    assert torch.equal(Bitmask().unpack(Bitmask().pack(mask)), mask)
    zeros = torch.zeros(6)
    assert torch.equal(Bitmask().unpack(Bitmask().pack(zeros)), zeros)


def test_non_mask_tensors_pass_through_unchanged():
    x = torch.randn(4, 4)
    assert Bitmask().pack(x) is x
    two_values = torch.tensor([0.0, 1.0, 2.0, 0.0])
    assert Bitmask().pack(two_values) is two_values
    negative = torch.tensor([0.0, -1.5, -1.5])
    assert torch.equal(Bitmask().unpack(Bitmask().pack(negative)), negative)


def test_fallback_int8_packs_what_is_not_a_mask():
    compressor = Bitmask(fallback="int8")
    mask = dropout_mask((6, 10))
    assert torch.equal(compressor.unpack(compressor.pack(mask)), mask)
    x = torch.randn(6, 10)
    packed = compressor.pack(x)
    assert packed_bytes(packed) == 60 + 6 * 4  # int8 codes + one float32 scale per row
    assert torch.allclose(compressor.unpack(packed), x, atol=x.abs().max().item() / 127)
