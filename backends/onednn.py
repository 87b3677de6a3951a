"""oneDNN's bf16 GEMM, for the numba backend's prefill in `matmul_precision="medium"` (optional).

A prefill is compute-bound: 512 tokens through Qwen3-0.6B are ~450 GFLOP of weight products. Two cores in float32
top out near 2 cores x 2 FMA units x 16 lanes x 2 flops x ~3 GHz ≈ 380 GFLOP/s (NumPy's sgemm reaches ~290 here),
so an fp32 prefill cannot go much faster than ~1 s. CPUs with bf16 matrix units (Intel AMX since Sapphire Rapids,
`vdpbf16ps` on AVX512-BF16 CPUs such as AMD Zen 4) multiply bf16 pairs at 2x (AVX512-BF16) to ~10x (AMX) that rate
while accumulating in float32. oneDNN (Intel's deep-learning primitives library, the one PyTorch uses on CPUs)
exposes exactly that as one C function, `dnnl_gemm_bf16bf16f32`; we call it through ctypes.

The library comes from the `onednn-cpu-gomp` wheel (part of the `fast` extra on x86-64 Linux). Without it, the
numba backend computes the same "medium" products (bf16-rounded inputs, float32 accumulation) with NumPy's sgemm:
the same numbers up to summation order, at fp32 speed. The same holds where the library is installed but the CPU
has no bf16 GEMM in it: oneDNN 3.2 implements `dnnl_gemm_bf16bf16f32` from AVX-512 up, and answers
"unimplemented" (status 3) on an AVX2-only CPU, so `available()` asks it once with a 1 x 1 x 1 product.
"""

from __future__ import annotations

import ctypes
import os
import sys
from functools import cache
from pathlib import Path

import numpy as np

LIBRARY_NAMES = ("libdnnl.so.3", "libdnnl.so")


def _candidates() -> list[Path]:
    paths = []
    if os.environ.get("TINYQWEN_DNNL"):  # an explicit library path wins
        paths.append(Path(os.environ["TINYQWEN_DNNL"]))
    for prefix in dict.fromkeys((sys.prefix, sys.base_prefix)):  # the wheel installs into <prefix>/lib
        paths += [Path(prefix) / "lib" / name for name in LIBRARY_NAMES]
    return paths


@cache
def library():
    """The oneDNN shared library with `dnnl_gemm_bf16bf16f32` typed, or None when it is not installed."""
    for path in _candidates():
        if not path.is_file():
            continue
        try:
            lib = ctypes.CDLL(str(path))
        except OSError:
            continue
        if not hasattr(lib, "dnnl_gemm_bf16bf16f32"):
            continue
        dim, ptr = ctypes.c_int64, ctypes.c_void_p
        lib.dnnl_gemm_bf16bf16f32.argtypes = [
            ctypes.c_char, ctypes.c_char, dim, dim, dim, ctypes.c_float,
            ptr, dim, ptr, dim, ctypes.c_float, ptr, dim,
        ]  # fmt: skip
        lib.dnnl_gemm_bf16bf16f32.restype = ctypes.c_int
        return lib
    return None


UNIMPLEMENTED = 3  # dnnl_unimplemented: no bf16 GEMM for this CPU


def _call(lib, x_bits: np.ndarray, w_bits: np.ndarray, out: np.ndarray) -> int:
    (M, K), N = x_bits.shape, w_bits.shape[0]
    # row-major C = 1·A·Bᵀ + 0·C; the weight is read in place in its [out, in] layout ("T"), with its row stride
    return lib.dnnl_gemm_bf16bf16f32(
        b"N", b"T", M, N, K, 1.0, x_bits.ctypes.data, K,
        w_bits.ctypes.data, w_bits.strides[0] // 2, 0.0, out.ctypes.data, N,
    )  # fmt: skip


@cache
def cpu_status() -> int | None:
    """oneDNN's status for a 1 x 1 x 1 bf16 product on this CPU: 0 when it has a bf16 GEMM here, UNIMPLEMENTED
    on a CPU without one (AVX2 only), None when oneDNN is not installed."""
    lib = library()
    if lib is None:
        return None
    one = np.full((1, 1), 0x3F80, np.uint16)
    return int(_call(lib, one, one, np.empty((1, 1), np.float32)))


def unavailable_reason() -> str | None:
    """None where `gemm_bf16` runs here; otherwise one line saying why not."""
    status = cpu_status()
    if status is None:
        return "oneDNN is not installed: pip install onednn-cpu-gomp (x86-64 Linux)"
    if status == UNIMPLEMENTED:
        return "oneDNN has no bf16 GEMM for this CPU (it needs AVX-512; this one has less): NumPy's sgemm is used"
    if status != 0:
        return f"oneDNN's bf16 GEMM fails on this CPU with status {status}"
    return None


def available() -> bool:
    return unavailable_reason() is None


def gemm_bf16(x_bits: np.ndarray, w_bits: np.ndarray) -> np.ndarray:  # [M, K] u16, [N, K] u16 -> [M, N] f32
    """x @ wᵀ for bf16 bit patterns, accumulated in float32 (oneDNN picks AMX / AVX512-BF16 / a fallback).

    >>> ones = np.full((2, 3), 0x3F80, np.uint16)       # bf16 1.0
    >>> gemm_bf16(ones, np.full((4, 3), 0x4000, np.uint16)) if available() else np.full((2, 4), 6.0, np.float32)
    array([[6., 6., 6., 6.],
           [6., 6., 6., 6.]], dtype=float32)
    """
    reason = unavailable_reason()
    if reason:
        raise RuntimeError(reason)
    x_bits = np.ascontiguousarray(x_bits, np.uint16)
    (M, K), N = x_bits.shape, w_bits.shape[0]
    if w_bits.shape[1] != K or w_bits.dtype != np.uint16 or w_bits.strides[1] != 2:
        raise ValueError(
            f"gemm_bf16: weight must be uint16 [N, {K}] with contiguous rows, got {w_bits.shape}"
        )
    out = np.empty((M, N), np.float32)
    status = _call(library(), x_bits, w_bits, out)
    if status != 0:
        raise RuntimeError(
            f"dnnl_gemm_bf16bf16f32 failed with status {status} for shapes {[M, K]} x {[N, K]}"
        )
    return out
