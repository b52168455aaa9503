"""The faster int8/int4/bitmask pack and unpack give bit-identical results to the original code.

The reference below is a frozen copy of the implementation before the speed-up (``abs().amax()``
for the scale, mixed-type multiplies, fresh temporaries); codes, scales and decoded tensors
must match it exactly (``torch.equal``), and packing must leave the input untouched. Inputs are
finite: the int4 code of a NaN or infinite element was, and is, the undefined result of casting
NaN to an integer type (it differs between the two, and between CPUs).
"""

from __future__ import annotations

import zlib

import pytest
import torch

from slimfit_accel.compression.packing import pack_nibbles, unpack_nibbles
from slimfit_accel.strategies.compression.bitmask import Bitmask, BitmaskPacked, _leading
from slimfit_accel.strategies.compression.int4 import Int4Scaled
from slimfit_accel.strategies.compression.int8 import Int8Scaled

# --- frozen reference: the implementation before the speed-up -------------------------------


def ref_as_groups(tensor, group_size):
    flat = tensor.detach().float().reshape(-1)
    if group_size is None:
        width = tensor.shape[-1] if tensor.dim() > 0 and tensor.shape[-1] > 0 else 1
        return flat.reshape(-1, width)
    pad = (-flat.numel()) % group_size
    if pad:
        flat = torch.nn.functional.pad(flat, (0, pad))
    return flat.reshape(-1, group_size)


def ref_from_groups(groups, shape, dtype):
    numel = 1
    for size in shape:
        numel *= size
    return groups.reshape(-1)[:numel].reshape(shape).to(dtype)


def ref_absmax_scale(groups, qmax):
    scale = groups.abs().amax(dim=1, keepdim=True).div_(qmax)
    return torch.where(scale > 0, scale, torch.ones_like(scale))


def ref_pack_nibbles(codes):
    flat = codes.reshape(-1).to(torch.uint8)
    if flat.numel() % 2:
        flat = torch.cat([flat, flat.new_zeros(1)])
    pairs = flat.reshape(-1, 2)
    return (pairs[:, 0] | (pairs[:, 1] << 4)).contiguous()


def ref_unpack_nibbles(packed, numel):
    low = packed & 0x0F
    high = packed >> 4
    return torch.stack([low, high], dim=1).reshape(-1)[:numel]


def ref_int8_pack(tensor, group_size, log_domain):
    if log_domain:  # affine in the log domain (tests/test_log_probs_compression.py says why)
        groups = ref_as_groups(tensor, group_size)
        high = groups.amax(dim=1, keepdim=True)
        low = torch.maximum(groups.amin(dim=1, keepdim=True), high - 200.0)
        step = ((high - low) / 255).clamp_min(torch.finfo(torch.float32).tiny)
        codes = torch.round(((groups - low).clamp_min(0)) / step).clamp(0, 255).to(torch.uint8)
        return codes, torch.cat([step, low], dim=1)
    groups = ref_as_groups(tensor, group_size)
    scale = ref_absmax_scale(groups, 127)
    codes = torch.mul(groups, scale.reciprocal()).round_().to(torch.int8)
    return codes, scale


def ref_int8_unpack(codes, scale, shape, dtype):
    if codes.dtype == torch.uint8:
        return ref_from_groups(codes.float() * scale[:, :1] + scale[:, 1:], shape, dtype)
    return ref_from_groups(torch.mul(codes, scale), shape, dtype)


def ref_int4_pack(tensor, group_size):
    groups = ref_as_groups(tensor, group_size)
    scale = ref_absmax_scale(groups, 7)
    codes = torch.round(groups / scale).clamp_(-7, 7).add_(8).to(torch.uint8)
    return ref_pack_nibbles(codes), scale, groups.shape[1]


def ref_int4_unpack(nibbles, scale, width, shape, dtype):
    rows = scale.shape[0]
    codes = ref_unpack_nibbles(nibbles, rows * width)
    groups = codes.reshape(rows, width).float().sub_(8) * scale
    return ref_from_groups(groups, shape, dtype)


# --- inputs ---------------------------------------------------------------------------------

LARGE = {torch.float32: 1e30, torch.bfloat16: 1e30, torch.float16: 6e4}  # finite, inf-free
SHAPES = [(4, 100), (3, 5), (2, 3, 7), (1,), (4, 1), (0, 4), (), (16, 64)]
GROUPS = [None, 1, 7, 64, 128]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def make_input(shape, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=gen)
    if x.dim() >= 2 and x.shape[0] >= 3:
        x[0] = 0.0  # a zero row
        x[1] = -0.0  # a negative-zero row
        x[2, 0] = LARGE[dtype]  # a huge but finite value
        x[2, -1] = -LARGE[dtype]
    if x.dim() >= 2 and x.shape[0] >= 4:
        x[3] = -x[3].abs()  # an all-negative row
    return x.to(dtype)


def cases():
    for dtype in DTYPES:
        for shape in SHAPES:
            for group_size in GROUPS:
                yield pytest.param(dtype, shape, group_size, id=f"{dtype}-{shape}-{group_size}")


def assert_same(actual, expected):
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    assert torch.equal(actual, expected)


@pytest.mark.parametrize("dtype,shape,group_size", list(cases()))
def test_int8_and_int4_match_the_original_bit_for_bit(dtype, shape, group_size):
    x = make_input(shape, dtype, seed=zlib.crc32(f"{dtype}{shape}{group_size}".encode()))
    for inp in (x, x.transpose(0, -1) if x.dim() >= 2 else x):  # contiguous and strided input
        before = inp.clone()

        packed = Int8Scaled(group_size=group_size).pack(inp)
        codes, scale = ref_int8_pack(inp, group_size, log_domain=False)
        assert_same(packed.codes, codes)
        assert_same(packed.scale, scale)
        assert_same(Int8Scaled(group_size=group_size).unpack(packed),
                    ref_int8_unpack(codes, scale, inp.shape, dtype))

        packed = Int4Scaled(group_size=group_size).pack(inp)
        nibbles, scale, width = ref_int4_pack(inp, group_size)
        assert_same(packed.nibbles, nibbles)
        assert_same(packed.scale, scale)
        assert packed.width == width
        assert_same(Int4Scaled(group_size=group_size).unpack(packed),
                    ref_int4_unpack(nibbles, scale, width, inp.shape, dtype))

        assert torch.equal(inp, before)  # in-place ops never reach the caller's tensor


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("group_size", GROUPS)
def test_int8_log_domain_matches_the_original_bit_for_bit(dtype, group_size):
    gen = torch.Generator().manual_seed(7)
    logits = torch.randn(3, 5, 50, generator=gen) * 8
    logits[0, 0] = 0.0  # a uniform row
    x = torch.log_softmax(logits, dim=-1).to(dtype)
    x[1, 1, :10] = -1e4  # probabilities that underflow to exactly zero
    before = x.clone()
    compressor = Int8Scaled(group_size=group_size, log_domain=True)
    packed = compressor.pack(x)
    codes, scale = ref_int8_pack(x, group_size, log_domain=True)
    assert_same(packed.codes, codes)
    assert_same(packed.scale, scale)
    assert_same(compressor.unpack(packed), ref_int8_unpack(codes, scale, x.shape, dtype))
    assert torch.equal(x, before)


def test_nan_rows_scale_like_the_original():
    x = torch.randn(4, 9)
    x[1, 3] = float("nan")
    packed = Int8Scaled().pack(x)
    _, scale = ref_int8_pack(x, None, log_domain=False)
    assert torch.equal(packed.scale, scale)  # NaN magnitude -> scale 1 in both


@pytest.mark.parametrize("numel", [0, 1, 2, 7, 1000, 1001])
def test_nibbles_match_the_original(numel):
    codes = torch.randint(0, 16, (numel,), dtype=torch.uint8, generator=torch.Generator().manual_seed(numel))
    packed = pack_nibbles(codes)
    assert_same(packed, ref_pack_nibbles(codes))
    assert packed.is_contiguous()
    assert_same(unpack_nibbles(packed, numel), ref_unpack_nibbles(packed, numel))


# --- bitmask: the probe copies only the elements it reads; the sign mode compares first ------


def ref_bitmask_pack(tensor, sign):
    """The bitmask pack before the speed-up: (bits, value) of a 0/c mask, None otherwise."""
    if sign:
        nonzero, value = tensor.detach().reshape(-1) > 0, torch.ones((), dtype=tensor.dtype)
    else:
        flat = tensor.detach().reshape(-1)
        if flat.numel() == 0 or not (tensor.is_floating_point() or tensor.dtype == torch.bool):
            return None
        if flat.dtype == torch.bool:
            nonzero, value = flat, torch.ones((), dtype=torch.bool)
        else:
            head = flat[:4096]
            head_nonzero = head[head != 0]
            if head_nonzero.numel() and not bool((head_nonzero == head_nonzero[0]).all()):
                return None
            nonzero = flat != 0
            if not bool(nonzero.any()):
                value = torch.zeros((), dtype=flat.dtype)
            else:
                value = head_nonzero[0] if head_nonzero.numel() else flat[nonzero.byte().argmax()]
                if not torch.equal(flat == value, nonzero):
                    return None
    codes = nonzero.view(torch.uint8)
    pad = (-codes.numel()) % 8
    if pad:
        codes = torch.nn.functional.pad(codes, (0, pad))
    columns = codes.reshape(-1, 8)
    packed = columns[:, 0].clone()
    for bit in range(1, 8):
        packed.bitwise_or_(columns[:, bit] << bit)
    return packed, value.to(tensor.dtype)


def bitmask_inputs():
    gen = torch.Generator().manual_seed(3)
    mask = (torch.rand(6, 5, 300, 7, generator=gen) > 0.1).float() * 1.25  # 0 / c, 63000 elements
    late = torch.zeros(4, 3, 2000)
    late[3, 2, 1999] = 2.0  # every probed element zero, one non-zero at the very end
    late_bad = late.clone()
    late_bad[3, 2, 1998] = 3.0  # a second value past the probe
    yield "mask", mask
    yield "mask-strided", mask.transpose(0, 2)  # the probe descends into a strided tensor
    yield "mask-bf16", mask.to(torch.bfloat16).permute(3, 1, 0, 2)
    yield "bool-strided", (mask > 0).transpose(1, 3)
    yield "operand-strided", torch.randn(8, 128, 9, 64, generator=gen).transpose(1, 2)  # attention q
    yield "operand-small", torch.randn(3, 5, generator=gen)
    yield "all-zero", torch.zeros(5, 4000)
    yield "late-value", late
    yield "late-value-strided", late.transpose(0, 2)
    yield "late-second-value", late_bad
    yield "negative-zero", torch.tensor([[0.0, -0.0, 2.0], [2.0, 0.0, -0.0]]).t()
    yield "nan", torch.tensor([[0.0, float("nan"), 1.0]] * 3).t()
    yield "scalar", torch.tensor(1.5)
    # the first-row rejection: rows of one sign, of one value, of zeros, with infinities
    yield "positive-values", torch.rand(4, 300, generator=gen) + 0.5  # a log-sum-exp: no zeros, many values
    yield "negative-mask", (torch.rand(5, 64, generator=gen) > 0.5).float() * -2.0
    yield "constant", torch.full((3, 7), 0.75)
    yield "constant-first-row", torch.cat([torch.full((1, 7), 0.75), torch.rand(2, 7, generator=gen) + 1])
    yield "zero-first-row", torch.cat([torch.zeros(1, 6), torch.randn(3, 6, generator=gen)])
    yield "infinities", torch.tensor([[float("-inf"), 0.0, float("inf")], [1.0, 1.0, 1.0]])
    yield "infinity-mask", torch.tensor([[float("inf"), 0.0, float("inf")], [0.0, 0.0, float("inf")]])
    yield "empty", torch.zeros(0, 3)
    yield "integer", torch.arange(12).reshape(3, 4)


@pytest.mark.parametrize("name,tensor", list(bitmask_inputs()), ids=[n for n, _ in bitmask_inputs()])
@pytest.mark.parametrize("sign", [False, True])
def test_bitmask_matches_the_original_bit_for_bit(name, tensor, sign):
    if sign and not tensor.is_floating_point():
        pytest.skip("the sign mode stores floating tensors only")
    before = tensor.clone()
    compressor = Bitmask(fallback="int8", sign=sign)
    packed = compressor.pack(tensor)
    expected = ref_bitmask_pack(tensor, sign)
    if expected is None:  # not a mask: the int8 fallback
        assert not isinstance(packed, BitmaskPacked)
        codes, scale = ref_int8_pack(tensor, None, log_domain=False)
        assert_same(packed.codes, codes)
        assert_same(packed.scale, scale)
    else:
        assert isinstance(packed, BitmaskPacked)
        assert_same(packed.bits, expected[0])
        assert_same(packed.value, expected[1])
        assert packed.shape == tensor.shape
        unpacked = compressor.unpack(packed)
        if not sign:
            assert torch.equal(unpacked, tensor)
    assert torch.equal(tensor, before) or tensor.isnan().any()


@pytest.mark.parametrize("name,tensor", list(bitmask_inputs()), ids=[n for n, _ in bitmask_inputs()])
@pytest.mark.parametrize("count", [1, 7, 4096, 10**6])
def test_the_probe_reads_the_flattened_prefix(name, tensor, count):
    torch.testing.assert_close(_leading(tensor, count), tensor.reshape(-1)[:count], rtol=0, atol=0, equal_nan=True)
