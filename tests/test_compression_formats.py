"""Built-in compressors: round trips, exact packed sizes, error bounds, odd sizes, registration."""

from __future__ import annotations

import math

import pytest
import torch

from slimfit_accel.compression.accounting import packed_bytes
from slimfit_accel.hookspecs import Compressor, SavedTensorContext
from slimfit_accel.strategies.compression import fixed_point, int4, int8, none, topk
from slimfit_accel.strategies.compression.fixed_point import FixedPoint, SlimFitAttentionFixed
from slimfit_accel.strategies.compression.int4 import Int4Scaled
from slimfit_accel.strategies.compression.int8 import Int8Scaled
from slimfit_accel.strategies.compression.none import NoCompression
from slimfit_accel.strategies.compression.topk import TopK

CTX = SavedTensorContext("layer", "Linear", "input", False, torch.float32, (1,))
ALL = [NoCompression(), Int8Scaled(), Int8Scaled(group_size=7), Int4Scaled(), Int4Scaled(group_size=5),
       FixedPoint(bits=4, step=0.5), FixedPoint(), SlimFitAttentionFixed(), TopK(0.3)]


@pytest.mark.parametrize("compressor", ALL, ids=lambda c: repr(c))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(3, 5), (2, 3, 7), (1,), (4, 1), (0, 4), ()])
def test_round_trip_keeps_shape_and_dtype(compressor, dtype, shape):
    x = torch.randn(shape).to(dtype)
    y = compressor.unpack(compressor.pack(x, CTX))
    assert isinstance(compressor, Compressor)
    assert y.shape == x.shape and y.dtype == dtype


def test_int8_per_row_error_is_half_a_step_and_bytes_exact():
    x = torch.randn(6, 33) * torch.logspace(-3, 3, 6)[:, None]  # rows of very different scales
    packed = Int8Scaled().pack(x, CTX)
    step = x.abs().amax(dim=1, keepdim=True) / 127
    assert ((Int8Scaled().unpack(packed) - x).abs() <= step / 2 + 1e-6 * step).all()
    assert packed_bytes(packed) == 6 * 33 + 6 * 4  # one byte per element + fp32 scale per row


def test_int8_groups_pad_odd_sizes():
    x = torch.randn(5, 9)
    packed = Int8Scaled(group_size=4).pack(x, CTX)
    assert packed.codes.shape == (12, 4) and packed.scale.shape == (12, 1)  # 45 -> 48 elements
    assert torch.allclose(Int8Scaled(group_size=4).unpack(packed), x, atol=x.abs().max().item() / 127)


@pytest.mark.parametrize("numel", [1, 2, 7, 15, 64])
def test_int4_packs_two_per_byte_with_odd_sizes(numel):
    x = torch.randn(numel)
    packed = Int4Scaled().pack(x, CTX)
    assert packed.nibbles.dtype == torch.uint8 and packed.nibbles.numel() == math.ceil(numel / 2)
    step = x.abs().max() / 7
    assert ((Int4Scaled().unpack(packed) - x).abs() <= step / 2 + 1e-6).all()


def test_int4_is_exact_on_its_grid():
    x = torch.arange(-7, 8, dtype=torch.float32).repeat(3, 1) * 0.25
    assert torch.equal(Int4Scaled().unpack(Int4Scaled().pack(x, CTX)), x)


def test_fixed_point_formats_match_the_reference():
    gelu = FixedPoint(bits=4, step=0.5)
    x = torch.tensor([-9.0, -4.0, -0.26, 0.0, 0.74, 3.5, 3.76, 100.0])
    assert gelu.unpack(gelu.pack(x, CTX)).tolist() == [-4.0, -4.0, -0.5, 0.0, 0.5, 3.5, 3.5, 3.5]
    assert packed_bytes(gelu.pack(x, CTX)) == 4  # 8 values, 4 bits each
    qk = FixedPoint(bits=8, step=1 / 16)
    assert qk.unpack(qk.pack(torch.tensor([-9.0, 7.95, 0.04]), CTX)).tolist() == [-8.0, 7.9375, 0.0625]
    attention = SlimFitAttentionFixed()
    probs = torch.softmax(torch.randn(4, 8), dim=-1)
    is_probability, inner = attention.pack(probs, CTX)
    assert is_probability and inner.codes.dtype == torch.uint8
    assert (attention.unpack((is_probability, inner)) - probs).abs().max() <= 1 / 512 + 1e-6


def test_topk_tensor_scope_keeps_the_largest_fraction_globally():
    x = torch.randn(10, 20)
    packed = TopK(0.1, scope="tensor").pack(x, CTX)
    y = TopK(0.1, scope="tensor").unpack(packed)
    assert int((y != 0).sum()) == 20
    threshold = x.abs().flatten().kthvalue(200 - 20).values
    assert torch.equal(y[y != 0], x[x.abs() > threshold])
    assert packed.indices.dtype == torch.int32 and packed_bytes(packed) == 20 * 4 + 20 * 4


def test_topk_row_scope_keeps_the_largest_fraction_of_each_row():
    x = torch.randn(10, 20)
    packed = TopK(0.1).pack(x, CTX)
    y = TopK(0.1).unpack(packed)
    assert ((y != 0).sum(dim=1) == 2).all()
    threshold = x.abs().kthvalue(20 - 2, dim=1, keepdim=True).values
    assert torch.equal(y != 0, x.abs() > threshold)
    assert torch.equal(y[y != 0], x[y != 0])
    assert packed.indices.dtype == torch.int16 and packed_bytes(packed) == 20 * 4 + 20 * 2


def test_none_returns_the_tensor_itself():
    x = torch.randn(3)
    assert NoCompression().unpack(NoCompression().pack(x, CTX)) is x


@pytest.mark.parametrize(
    "make", [lambda: Int8Scaled(group_size=0), lambda: Int4Scaled(group_size=-1), lambda: TopK(0.0),
             lambda: TopK(1.5), lambda: FixedPoint(bits=3), lambda: FixedPoint(step=0)]
)
def test_bad_options_fail_early(make):
    with pytest.raises(ValueError):
        make()


def test_each_module_registers_its_compressors():
    names = {}
    for module in (none, int8, int4, fixed_point, topk):
        module.register_compressors(register=lambda name, factory: names.setdefault(name, factory))
    assert names == {"none": NoCompression, "int8": Int8Scaled, "int4": Int4Scaled, "fixed_point": FixedPoint,
                     "slimfit_attention": SlimFitAttentionFixed, "topk": TopK}
