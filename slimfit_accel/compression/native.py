"""Fused CPU kernels for the built-in int8 / int4 / log-domain compressors, built on first use.

Quantizing a saved activation with torch ops on CPU walks the tensor four or five times (min,
max, scale, round, cast), and SlimFit's compression was 22% of a full SmolLM2 step on CPU. The C
kernels in ``kernels.c`` do a row in one pass from cache and give bit-identical codes, scales and
unpacked values (``tests/test_native_kernels.py``). They are compiled once per machine with the
system C compiler into ``~/.cache/slimfit_accel/kernels`` (or ``$SLIMFIT_KERNEL_CACHE``), a plain
shared library called through ``ctypes``: no torch headers, so a build takes about a second
(a torch C++ extension takes a minute). Without a compiler, or with ``SLIMFIT_NATIVE_KERNELS=0``,
or for tensors they do not cover (CUDA, float16, NaN or infinite values, odd int4 rows), the
compressors run their torch code: same results, slower. Large tensors are split by rows over
``torch.get_num_threads()`` threads (ctypes releases the GIL).

Example::

    from slimfit_accel.compression import native
    if native.available():
        codes, scale = native.int8_pack(torch.randn(8, 512, 576))
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable

import torch

SOURCE = Path(__file__).with_name("kernels.c")
FLAGS = ["-O3", "-march=native", "-ffp-contract=off", "-fno-math-errno", "-fno-trapping-math", "-fPIC", "-shared"]
PARALLEL_MIN_NUMEL = 1 << 20  # below this one thread: starting workers costs more than it saves

_lock = threading.Lock()
_library: ctypes.CDLL | None = None
_tried = False
_pool: ThreadPoolExecutor | None = None


def _cpu_fingerprint() -> str:
    """What -march=native compiles for: a library built on one CPU is never loaded on another."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _cache_dir() -> Path:
    return Path(os.environ.get("SLIMFIT_KERNEL_CACHE") or Path.home() / ".cache" / "slimfit_accel" / "kernels")


def _compiler() -> str | None:
    return os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")


def _target(compiler: str) -> Path:
    """The cached library for this source, compiler, flags and CPU."""
    key = hashlib.sha256(SOURCE.read_bytes() + " ".join(FLAGS).encode() + compiler.encode() + _cpu_fingerprint().encode()
                         + platform.machine().encode() + sys.platform.encode()).hexdigest()[:16]
    return _cache_dir() / f"slimfit_kernels_{key}.so"


def _build() -> ctypes.CDLL | None:
    compiler = _compiler()
    if compiler is None:
        warnings.warn("SlimFit: no C compiler found; activation compression runs its slower torch code "
                      "(install gcc or clang for the fused CPU kernels)", stacklevel=3)
        return None
    target = _target(compiler)
    if not target.exists():
        error = _compile(compiler, target)
        if error is not None:
            warnings.warn(f"SlimFit: building the fused compression kernels with {compiler} into {target.parent} "
                          f"failed; activation compression runs its slower torch code (set SLIMFIT_KERNEL_CACHE to a "
                          f"writable folder, or SLIMFIT_NATIVE_KERNELS=0 to silence this):\n{error}", stacklevel=3)
            return None
    try:
        library = ctypes.CDLL(str(target))
    except OSError as exc:  # a damaged cache file: say so, run the torch code
        warnings.warn(f"SlimFit: loading the fused compression kernels {target} failed ({exc}); activation "
                      "compression runs its slower torch code (delete the file to rebuild it)", stacklevel=3)
        return None
    pointer, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    for name in ("sf_int8_pack", "sf_int4_pack", "sf_log_pack"):
        getattr(library, name).argtypes = [pointer, i32, i64, i64, pointer, pointer, i64, pointer]
        getattr(library, name).restype = i32
    for name in ("sf_int8_unpack", "sf_int4_unpack", "sf_log_unpack"):
        getattr(library, name).argtypes = [pointer, pointer, i64, i64, pointer, i32]
        getattr(library, name).restype = i32
    return library


def _compile(compiler: str, target: Path) -> str | None:
    """Build the library at ``target``; the error text if it failed. Built beside the target and
    renamed, so concurrent processes never load a half-written file."""
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=target.parent) as scratch:
            built = Path(scratch) / target.name
            result = subprocess.run([compiler, *FLAGS, str(SOURCE), "-o", str(built), "-lm"],
                                    capture_output=True, text=True, timeout=120)
            if result.returncode != 0:
                return result.stderr[-2000:] or f"exit status {result.returncode}"
            os.replace(built, target)
    except (OSError, subprocess.SubprocessError) as exc:
        return f"{type(exc).__name__}: {exc}"
    return None


def _enabled() -> bool:
    """``SLIMFIT_NATIVE_KERNELS``: 1/true/yes/on (default) or 0/false/no/off; anything else is refused,
    so a misspelt switch never leaves the kernels on silently."""
    value = os.environ.get("SLIMFIT_NATIVE_KERNELS", "1").strip().lower()
    if value in ("1", "true", "yes", "on", ""):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"SLIMFIT_NATIVE_KERNELS={os.environ['SLIMFIT_NATIVE_KERNELS']!r}: use 0/false/no/off to switch "
                     "the fused compression kernels off, 1/true/yes/on (the default) to keep them")


def _load() -> ctypes.CDLL | None:
    global _library, _tried
    if not _tried:
        with _lock:
            if not _tried:
                if _enabled():
                    _library = _build()
                _tried = True
    return _library


def available() -> bool:
    """Whether the fused kernels are built and enabled on this machine."""
    return _load() is not None


def _plain_cpu(tensor: torch.Tensor) -> bool:
    """A dense CPU tensor with real memory: not a fake or meta tensor (the planner runs steps on
    fake tensors), not a tensor subclass (functional, distributed), not sparse."""
    return type(tensor) in (torch.Tensor, torch.nn.Parameter) and tensor.device.type == "cpu" \
        and tensor.layout == torch.strided


def covers(tensor: torch.Tensor) -> bool:
    """Whether ``tensor`` (about to be packed) can take the fused path."""
    return _plain_cpu(tensor) and tensor.dtype in (torch.float32, torch.bfloat16) and available()


def covers_unpacked(codes: torch.Tensor, dtype: torch.dtype) -> bool:
    """Whether packed ``codes`` (to come back as ``dtype``) can take the fused path."""
    return _plain_cpu(codes) and dtype in (torch.float32, torch.bfloat16) and available()


def _by_rows(kernel: Callable, rows: int, width: int, arguments: Callable[[int, int], tuple]) -> int:
    """Run ``kernel`` over rows [0, rows), split over torch's thread count for large tensors."""
    threads = min(torch.get_num_threads(), rows)
    if threads <= 1 or rows * width < PARALLEL_MIN_NUMEL:
        return kernel(*arguments(0, rows))
    global _pool
    if _pool is None or _pool._max_workers < threads:  # noqa: SLF001
        _pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="slimfit-kernels")
    bounds = [rows * t // threads for t in range(threads + 1)]
    futures = [_pool.submit(kernel, *arguments(lo, hi)) for lo, hi in zip(bounds, bounds[1:]) if hi > lo]
    return max(f.result() for f in futures)


class _Layout(ctypes.Structure):
    """``Layout`` in kernels.c: the leading sizes and strides of a strided view's rows."""

    _fields_ = [("sizes", ctypes.c_int64 * 8), ("strides", ctypes.c_int64 * 8), ("out_strides", ctypes.c_int64 * 8),
                ("nlead", ctypes.c_int32)]


def _rows_layout(tensor: torch.Tensor) -> tuple[torch.Tensor, _Layout | None]:
    """The tensor (copied only if its last dimension is strided) and how its rows are laid out."""
    if tensor.is_contiguous():
        return tensor, None
    if tensor.stride(-1) != 1 or tensor.dim() - 1 > 8:
        return tensor.contiguous(), None
    lead = tensor.dim() - 1
    out_strides = [1] * lead  # a row's index in the logical (row-major) order
    for d in range(lead - 2, -1, -1):
        out_strides[d] = out_strides[d + 1] * tensor.shape[d + 1]
    # walk the dimensions from the largest stride to the smallest: memory order, cache-friendly
    order = sorted(range(lead), key=lambda d: -tensor.stride(d))
    layout = _Layout()
    layout.nlead = lead
    for i, d in enumerate(order):
        layout.sizes[i], layout.strides[i], layout.out_strides[i] = tensor.shape[d], tensor.stride(d), out_strides[d]
    return tensor, layout


def _pack(kernel_name: str, tensor: torch.Tensor, code_dtype: torch.dtype, code_width: int, scale_width: int):
    width = tensor.shape[-1]
    rows = tensor.numel() // width
    tensor, layout = _rows_layout(tensor)
    codes = torch.empty(rows, code_width, dtype=code_dtype)
    scale = torch.empty(rows, scale_width, dtype=torch.float32)
    kernel = getattr(_load(), kernel_name)
    bf16 = int(tensor.dtype == torch.bfloat16)
    x, c, s = tensor.data_ptr(), codes.data_ptr(), scale.data_ptr()
    layout_ref = ctypes.byref(layout) if layout is not None else None

    def arguments(lo: int, hi: int) -> tuple:  # the kernel writes each row at its own place
        return (x, bf16, hi - lo, width, c, s, lo, layout_ref)

    if _by_rows(kernel, rows, width, arguments):
        return None
    return codes, scale


def _unpack(kernel_name: str, codes: torch.Tensor, scale: torch.Tensor, width: int, dtype: torch.dtype) -> torch.Tensor:
    rows = scale.shape[0]
    out = torch.empty(rows, width, dtype=dtype)
    kernel = getattr(_load(), kernel_name)
    bf16 = int(dtype == torch.bfloat16)
    code_width, scale_width = codes.numel() // max(rows, 1), scale.shape[1]
    c, s, o, size = codes.data_ptr(), scale.data_ptr(), out.data_ptr(), out.element_size()

    def arguments(lo: int, hi: int) -> tuple:
        return (c + lo * code_width, s + lo * scale_width * 4, hi - lo, width, o + lo * width * size, bf16)

    _by_rows(kernel, rows, width, arguments)
    return out


def int8_pack(tensor: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``Int8Scaled.pack`` of a float32/bfloat16 CPU tensor, a scale per row of its last dimension:
    (codes (rows x width), scale (rows x 1)), or None where a row holds a NaN or infinity (the
    caller runs the torch code)."""
    return _pack("sf_int8_pack", tensor, torch.int8, tensor.shape[-1], 1)


def int8_unpack(codes: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """codes x scale per row, as ``dtype`` (float32 or bfloat16), shape of ``codes``."""
    return _unpack("sf_int8_unpack", codes.contiguous(), scale.contiguous(), codes.shape[1], dtype)


def int4_pack(tensor: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``Int4Scaled.pack`` with an even row width: (nibbles (rows x width/2), scale)."""
    if tensor.shape[-1] % 2:
        return None
    return _pack("sf_int4_pack", tensor, torch.uint8, tensor.shape[-1] // 2, 1)


def int4_unpack(nibbles: torch.Tensor, scale: torch.Tensor, width: int, dtype: torch.dtype) -> torch.Tensor:
    return _unpack("sf_int4_unpack", nibbles.contiguous(), scale.contiguous(), width, dtype)


def log_pack(tensor: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``Int8Scaled(log_domain=True).pack``: (uint8 codes, [step, low] per row)."""
    return _pack("sf_log_pack", tensor, torch.uint8, tensor.shape[-1], 2)


def log_unpack(codes: torch.Tensor, step_low: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return _unpack("sf_log_unpack", codes.contiguous(), step_low.contiguous(), codes.shape[1], dtype)
