"""The fused CPU kernels pack and unpack exactly what the compressors' torch code does.

Each case packs the same tensor twice, once through the kernels and once with them switched off,
and requires every packed field and the unpacked tensor to be equal (``torch.equal``): float32
and bfloat16, rows and groups, odd widths, strided views, log-probabilities with -inf, tensors
large enough to be split over threads. A NaN or infinity makes the kernels hand the tensor back
to the torch code (same result as with them off); no compiler means the torch code, with a warning.
"""

from __future__ import annotations

import pytest
import torch

from slimfit_accel.compression import native
from slimfit_accel.strategies.compression.bitmask import Bitmask
from slimfit_accel.strategies.compression.int4 import Int4Scaled
from slimfit_accel.strategies.compression.int8 import Int8Scaled

pytestmark = pytest.mark.skipif(not native.available(), reason="no C compiler: the kernels are not built")


@pytest.fixture
def torch_code(monkeypatch):
    """A context in which the kernels are off (the compressors run their torch code)."""

    class Off:
        def __enter__(self):
            self.library = native._library  # noqa: SLF001
            native._library = None  # noqa: SLF001
            return self

        def __exit__(self, *exc):
            native._library = self.library  # noqa: SLF001

    return Off


def _equal(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    return a == b


def _pack_both(compressor, tensor, torch_code):
    fused = compressor.pack(tensor)
    fused_out = compressor.unpack(fused)
    with torch_code():
        reference = compressor.pack(tensor)
        reference_out = compressor.unpack(reference)
    return fused, fused_out, reference, reference_out


def _assert_identical(compressor, tensor, torch_code):
    fused, fused_out, reference, reference_out = _pack_both(compressor, tensor, torch_code)
    assert type(fused) is type(reference)
    for field, a, b in zip(fused._fields, fused, reference):
        assert _equal(a, b), f"{compressor}: packed field {field} differs"
    assert _equal(fused_out, reference_out), f"{compressor}: unpacked tensor differs"
    assert fused_out.dtype == tensor.dtype and fused_out.shape == tensor.shape


COMPRESSORS = [Int8Scaled(), Int8Scaled(group_size=64), Int4Scaled(), Int4Scaled(group_size=32)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("compressor", COMPRESSORS, ids=repr)
@pytest.mark.parametrize("shape", [(3, 7, 576), (2, 1536), (5, 64), (4, 10)])
def test_scaled_formats_bit_identical(compressor, shape, dtype, torch_code):
    generator = torch.Generator().manual_seed(sum(shape))
    x = (torch.randn(shape, generator=generator) * torch.rand(shape[-1], generator=generator) * 5).to(dtype)
    x.view(-1)[:7] = 0.0  # exact zeros, and a whole zero row below
    x.reshape(-1, shape[-1])[-1] = 0.0
    _assert_identical(compressor, x, torch_code)


@pytest.mark.parametrize("compressor", [Int8Scaled(), Int4Scaled()], ids=repr)
def test_odd_widths_and_strided_views(compressor, torch_code):
    x = torch.randn(2, 9, 6, 33)  # odd rows: int4 takes its torch code, int8 the kernel
    _assert_identical(compressor, x, torch_code)
    q = torch.randn(2, 64, 3, 64).transpose(1, 2)  # attention operands: a strided view
    _assert_identical(compressor, q, torch_code)
    _assert_identical(compressor, torch.randn(10, 4, 50)[:, :, 1:49], torch_code)
    _assert_identical(compressor, torch.randn(5, 3, 4, 2, 16).permute(3, 1, 4, 0, 2)[..., :8].transpose(-1, -2).contiguous().transpose(1, 2), torch_code)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_log_probabilities_bit_identical(dtype, torch_code):
    logits = torch.randn(6, 5, 1000, generator=torch.Generator().manual_seed(1)) * 6
    logits[0, 0, :10] = float("-inf")  # masked vocabulary entries: -inf log-probabilities
    log_probs = torch.log_softmax(logits, dim=-1).to(dtype)
    _assert_identical(Int8Scaled(log_domain=True), log_probs, torch_code)
    flat = torch.zeros(2, 4, dtype=dtype)  # one value per row: step at its floor
    _assert_identical(Int8Scaled(log_domain=True), flat, torch_code)


def _bits(tensor: torch.Tensor) -> torch.Tensor:
    """The raw bytes (``torch.equal`` calls -0.0 and 0.0 equal; these do not)."""
    return tensor.contiguous().view(torch.uint8)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("compressor", [Int8Scaled(), Int4Scaled()], ids=repr)
def test_edge_values_bit_identical(compressor, dtype, torch_code):
    """The kernels' scale is the largest |x| taken on the bits (an integer max): rows of signed
    zeros, denormals (whose scale rounds, so int4 codes reach the clamp), the largest floats and
    exact halves give the torch code's bytes."""
    generator = torch.Generator().manual_seed(7)
    rows = [
        torch.zeros(48), torch.full((48,), -0.0), torch.randn(48, generator=generator).sign() * 0.0,
        torch.randint(-11, 12, (48,), generator=generator).float() * 1.401298464324817e-45,  # denormals
        torch.tensor([10 * 1.401298464324817e-45] + [0.0] * 47),  # scale 1 ulp after rounding: code 10, clamped
        (torch.rand(48, generator=generator) * 2 - 1) * 3.0e38,  # near the largest floats (bfloat16's too)
        (torch.randn(48, generator=generator) * 8).round() / 2,  # exact halves: ties to even
        torch.cat([torch.tensor([-7.0, 7.0]), torch.randn(46, generator=generator)]),
    ]
    x = torch.stack(rows).to(dtype)
    fused, fused_out, reference, reference_out = _pack_both(compressor, x, torch_code)
    for field, a, b in zip(fused._fields, fused, reference):
        if isinstance(a, torch.Tensor):
            assert torch.equal(_bits(a), _bits(b)), f"{compressor}: packed field {field} differs"
    assert torch.equal(_bits(fused_out), _bits(reference_out))


@pytest.mark.parametrize("compressor", [Int8Scaled(), Int4Scaled(), Int8Scaled(log_domain=True)], ids=repr)
def test_split_over_threads_bit_identical(compressor, torch_code, monkeypatch):
    monkeypatch.setattr(native, "PARALLEL_MIN_NUMEL", 1)
    threads = torch.get_num_threads()
    torch.set_num_threads(3)
    try:
        x = torch.randn(37, 256)
        strided = torch.randn(3, 37, 5, 64).transpose(1, 2)  # thread bounds fall inside its dimensions
        if getattr(compressor, "log_domain", False):
            x, strided = torch.log_softmax(x, dim=-1), torch.log_softmax(strided, dim=-1)
        _assert_identical(compressor, x, torch_code)
        _assert_identical(compressor, strided, torch_code)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("compressor", [Int8Scaled(), Int4Scaled()], ids=repr)
def test_non_finite_rows_take_the_torch_code(compressor, bad, torch_code):
    x = torch.randn(4, 64)
    x[2, 5] = bad
    assert native.int8_pack(x) is None and native.int4_pack(x) is None
    fused = compressor.pack(x)
    with torch_code():
        reference = compressor.pack(x)
    scale = fused[1]
    assert _equal(scale, reference[1])  # same scales (the NaN row's included): the same code ran
    finite = torch.ones(4, dtype=torch.bool)
    finite[2] = False
    codes = fused[0].reshape(4, -1)
    assert torch.equal(codes[finite], reference[0].reshape(4, -1)[finite])


def test_attention_operands_through_bitmask_fallback(torch_code):
    compressor = Bitmask(fallback="int8")
    q = torch.randn(2, 3, 16, 64)
    _assert_identical(compressor, q, torch_code)


def test_no_compiler_warns_and_uses_torch_code(monkeypatch, tmp_path):
    monkeypatch.setattr(native, "_library", None)
    monkeypatch.setattr(native, "_tried", False)
    monkeypatch.setenv("SLIMFIT_KERNEL_CACHE", str(tmp_path))
    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    monkeypatch.setattr(native.shutil, "which", lambda name: None)
    with pytest.warns(UserWarning, match="building the fused compression kernels"):
        assert not native.available()
    x = torch.randn(4, 8)
    packed = Int8Scaled().pack(x)
    assert packed.codes.dtype == torch.int8 and Int8Scaled().unpack(packed).shape == x.shape


def test_switched_off_by_environment(monkeypatch):
    monkeypatch.setattr(native, "_library", None)
    monkeypatch.setattr(native, "_tried", False)
    monkeypatch.setenv("SLIMFIT_NATIVE_KERNELS", "0")
    assert not native.available()
    assert native.covers(torch.randn(3)) is False


@pytest.mark.parametrize("value", ["false", "No", "off"])
def test_switched_off_by_any_usual_word(monkeypatch, value):
    monkeypatch.setattr(native, "_library", None)
    monkeypatch.setattr(native, "_tried", False)
    monkeypatch.setenv("SLIMFIT_NATIVE_KERNELS", value)
    assert not native.available()


def test_a_misspelt_switch_is_refused(monkeypatch):
    monkeypatch.setattr(native, "_library", None)
    monkeypatch.setattr(native, "_tried", False)
    monkeypatch.setenv("SLIMFIT_NATIVE_KERNELS", "disable")
    with pytest.raises(ValueError, match="SLIMFIT_NATIVE_KERNELS='disable'"):
        native.available()


def test_fake_and_meta_tensors_take_the_torch_code():
    """The planner runs real steps on fake tensors: they have no memory for a kernel to read."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        x = torch.randn(8, 64)
        assert not native.covers(x)
        packed = Int8Scaled().pack(x)
        assert Int8Scaled().unpack(packed).shape == (8, 64)
        packed4 = Int4Scaled().pack(x)
        assert Int4Scaled().unpack(packed4).shape == (8, 64)
    assert not native.covers(torch.randn(8, 64, device="meta"))


def test_unwritable_cache_warns_and_uses_torch_code(monkeypatch, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    monkeypatch.setattr(native, "_library", None)
    monkeypatch.setattr(native, "_tried", False)
    monkeypatch.setenv("SLIMFIT_KERNEL_CACHE", str(blocker / "kernels"))
    with pytest.warns(UserWarning, match="SLIMFIT_KERNEL_CACHE"):
        assert not native.available()
    assert Int8Scaled().pack(torch.randn(4, 8)).codes.dtype == torch.int8


def test_damaged_library_warns_and_uses_torch_code(monkeypatch, tmp_path):
    monkeypatch.setattr(native, "_library", None)
    monkeypatch.setattr(native, "_tried", False)
    monkeypatch.setenv("SLIMFIT_KERNEL_CACHE", str(tmp_path))
    native._target(native._compiler()).write_bytes(b"not a shared library")  # noqa: SLF001
    with pytest.warns(UserWarning, match="delete the file"):
        assert not native.available()
