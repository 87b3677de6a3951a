"""Scalar building blocks the kernels inline: bf16 and float32 bit casts, prefetch hints, a vectorisable exp, SiLU,
rounding to bf16, and the lookup of a stacked row's weight. Each compiles to a few instructions in registers (Numba
has no scalar bit-cast of its own). Also the IR of AVX512-BF16's dot product (`dpbf16ps`) for the kernels that
write theirs in IR, and whether Numba's target has a CPU feature.
"""

from __future__ import annotations

import os
from functools import cache

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic

# reassociation lets LLVM vectorise the float32 dot products (8 or 16 partial sums, as BLAS does); no other
# fast-math flags, so NaN and inf still propagate as in the NumPy reference. Kernels that divide also take
# error_model="numpy" (x / 0 gives inf as in NumPy, instead of a ZeroDivisionError check per value, which stops
# vectorisation: SiLU·mul over [512, 3072] took 9.4 ms with the check, 2.2 ms without).
FAST = {"reassoc"}


@intrinsic
def _bf16(typingctx, u):
    """uint16 bf16 bit pattern -> float32, in a register: zero-extend, shift left 16, reinterpret the 32 bits.

    Numba has no scalar bit-cast, so this is one LLVM instruction sequence; the dot products around it still
    vectorise (about 20 GB/s of bf16 per core measured here, against 10 GB/s for NumPy's float32 GEMV).
    """

    def codegen(context, builder, signature, args):
        wide = builder.zext(args[0], ir.IntType(32))
        return builder.bitcast(builder.shl(wide, ir.Constant(ir.IntType(32), 16)), ir.FloatType())

    return types.float32(types.uint16), codegen


@intrinsic
def _bf16_lo(typingctx, u):
    """The first of the two bf16 numbers a uint32 holds (little-endian: its low 16 bits) -> float32: shift left 16."""

    def codegen(context, builder, signature, args):
        return builder.bitcast(builder.shl(args[0], ir.Constant(ir.IntType(32), 16)), ir.FloatType())

    return types.float32(types.uint32), codegen


@intrinsic
def _bf16_hi(typingctx, u):
    """The second of the two bf16 numbers a uint32 holds (its high 16 bits) -> float32: clear the low 16 bits.

    With _bf16_lo, one 32-bit load gives two weights for two instructions (an AND, a shift), where _bf16 widens
    each 16-bit weight on its own (a zero-extending load and a shift per weight).
    """

    def codegen(context, builder, signature, args):
        mask = ir.Constant(ir.IntType(32), 0xFFFF0000)
        return builder.bitcast(builder.and_(args[0], mask), ir.FloatType())

    return types.float32(types.uint32), codegen


@intrinsic
def _f16(typingctx, u):
    """uint16 IEEE half-precision bit pattern -> float32, in a register (exact: every fp16 is a float32).

    The block scales of GGUF's quantized weights (Q8_0's d, Q4_K's d and dmin, Q6_K's d) are fp16; LLVM turns
    this into one `vcvtph2ps` on x86 CPUs with F16C.
    """

    def codegen(context, builder, signature, args):
        return builder.fpext(builder.bitcast(args[0], ir.HalfType()), ir.FloatType())

    return types.float32(types.uint16), codegen


@intrinsic
def _round_f16(typingctx, f):
    """float32 -> the nearest fp16 (ties to even), as float32 again: how llama.cpp stores a Q8_0 block's scale."""

    def codegen(context, builder, signature, args):
        return builder.fpext(builder.fptrunc(args[0], ir.HalfType()), ir.FloatType())

    return types.float32(types.float32), codegen


@intrinsic
def _f32_bits(typingctx, f):
    """float32 -> its uint32 bit pattern (a reinterpretation, like `.view(np.uint32)` on an array)."""

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.IntType(32))

    return types.uint32(types.float32), codegen


@intrinsic
def _f32_from_bits(typingctx, u):
    """int32 bit pattern -> the float32 it encodes (the inverse reinterpretation)."""

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.FloatType())

    return types.float32(types.int32), codegen


@intrinsic
def _prefetch(typingctx, a, i):
    """Ask the CPU to start loading the cache line holding a[i] (1-D array) now: `llvm.prefetch`, no result."""

    def codegen(context, builder, signature, args):
        arr = context.make_array(signature.args[0])(context, builder, args[0])
        address = builder.bitcast(builder.gep(arr.data, [args[1]]), ir.IntType(8).as_pointer())
        i32 = ir.IntType(32)
        fn = cgutils.get_or_insert_function(
            builder.module,
            ir.FunctionType(ir.VoidType(), [address.type, i32, i32, i32]),
            "llvm.prefetch.p0i8",
        )
        # read (0), keep in all cache levels (3), data (1)
        builder.call(fn, [address, ir.Constant(i32, 0), ir.Constant(i32, 3), ir.Constant(i32, 1)])
        return context.get_dummy_value()

    return types.void(a, i), codegen


# A prefetch is only a hint (the results never change); how far ahead pays was measured (Sapphire Rapids, 2 cores):
# - decode attention spends ~100 cycles on each cached key (then value) row before the next: too slow a stream for
#   the hardware prefetcher to run far enough ahead. Asking for the row 16 positions ahead took a bf16 layer of 520
#   positions from ~320 to ~210 us on one thread (the rows already in cache: ~190);
# - the decode GEMVs: asking for the next weight row (2 KiB) while the current one is summed took the GEMVs of a
#   Qwen3-0.6B decode step from 47.4 to 44.8 ms; two or four rows ahead were slower (48.0, 51.0).
PREFETCH_ROWS = 16  # decode attention


@njit(cache=True, fastmath=FAST, error_model="numpy", inline="always")
def _prefetch_row(a):  # every cache line of a C-contiguous 1-D row
    step = max(1, 64 // a.itemsize)
    for j in range(0, a.shape[0], step):
        _prefetch(a, j)


# Weight rows up to this size are prefetched one row ahead; longer rows are not. Measured on the lm_head shape
# (151,936 rows, 2 threads): 1,024-wide bf16 rows (2 KiB) streamed at 32.9 GB/s prefetched vs 27.3 without, while
# 2,048-wide rows (4 KiB) went from 27.4 to 25.9 (the hardware prefetcher already runs far enough inside a long row).
PREFETCH_MAX_ROW_BYTES = 2048


@njit(cache=True, fastmath=FAST, error_model="numpy", inline="always")
def _prefetch_weight_row(a):  # the next weight row of a GEMV, when it is short enough to gain from it
    if a.shape[0] * a.itemsize <= PREFETCH_MAX_ROW_BYTES:
        _prefetch_row(a)


@njit(cache=True, fastmath=FAST, error_model="numpy", inline="always")
def _exp(x):  # float32 -> float32
    """e^x that LLVM can vectorise: Numba's np.exp on a scalar calls libm once per value (3.3 ns here), which made
    exp the slowest part of softmax and SiLU; this runs at ~0.5 ns per value, within 1e-7 relative (float32's own
    np.exp: 2e-7). e^x = 2^n · e^r with n = round(x / ln 2), |r| ≤ ln 2 / 2, and e^r by Taylor to r^7 (< 2e-9).
    Below -87 it returns 0 (float32's smallest normal is e^-87.3): the masked scores' exp(MASKED - max) is 0.
    """
    xc = min(max(x, np.float32(-87.0)), np.float32(88.0))
    n = np.floor(xc * np.float32(1.4426950408889634) + np.float32(0.5))
    r = xc - n * np.float32(0.693359375) - n * np.float32(-2.12194440e-4)  # ln 2 in two parts: r stays exact
    p = np.float32(1.0 / 5040)  # Horner, written out: a loop over a tuple of constants stops vectorisation
    p = p * r + np.float32(1.0 / 720)
    p = p * r + np.float32(1.0 / 120)
    p = p * r + np.float32(1.0 / 24)
    p = p * r + np.float32(1.0 / 6)
    p = p * r + np.float32(0.5)
    p = p * r + np.float32(1.0)
    p = p * r + np.float32(1.0)
    scale = _f32_from_bits(
        np.int32((np.int32(n) + np.int32(127)) << np.int32(23))
    )  # 2^n, built from its bits
    return np.float32(0.0) if x < np.float32(-87.0) else p * scale


@njit(cache=True, fastmath=FAST, error_model="numpy")
def _exp_into(x, out):  # [n] f32 -> out [n]: _exp over an array (the tests check its accuracy through this)
    for i in range(x.size):
        out[i] = _exp(x[i])


@njit(cache=True, fastmath=FAST, error_model="numpy", inline="always")
def _silu(
    z,
):  # float32 -> float32: z · sigmoid(z), as the reference writes it (no overflow for very negative z)
    return z / (np.float32(1.0) + _exp(-z))


@njit(cache=True, nogil=True)
def _to_bf16(f):  # float32 -> bf16 bit pattern, rounded to nearest, ties to even (as torch's .to(bfloat16))
    u = _f32_bits(f)
    if f != f:  # NaN stays NaN, sign kept (rounding its bits could carry into infinity)
        return np.uint16(0xFFC0) if u >> np.uint32(31) else np.uint16(0x7FC0)
    return np.uint16((u + np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16))


@njit(cache=True, nogil=True)
def _round_rows_bf16(x, bits, values):  # [M, K] f32 -> bits [M, K] u16 and values [M, K] f32 (both written)
    M, K = x.shape
    for m in range(M):
        for k in range(K):
            b = _to_bf16(x[m, k])
            bits[m, k] = b
            values[m, k] = _bf16(b)


def round_bf16(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:  # [M, K] f32 -> ([M, K] u16, [M, K] f32)
    """The bf16 nearest to each value: its bit patterns, and the same numbers as float32.

    >>> bits, values = round_bf16(np.array([[1.0, 1.00390625, 1.01171875, 3.14159]], np.float32))
    >>> [hex(b) for b in bits[0]], values[0].tolist()   # 1 + 2⁻⁸ is a tie: to even (1.0); 1 + 3·2⁻⁸ rounds up
    (['0x3f80', '0x3f80', '0x3f82', '0x4049'], [1.0, 1.0, 1.015625, 3.140625])
    """
    bits = np.empty(x.shape, np.uint16)
    values = np.empty(x.shape, np.float32)
    _round_rows_bf16(x, bits, values)
    return bits, values


@njit(cache=True, inline="always")
def _weight_of(starts, i, r):  # the weight holding stacked row r, searching on from weight i
    # (a launch over several weights, q/k/v or gate/up, runs over their rows stacked: starts = [0, N0, N0 + N1, ...])
    while r >= starts[i + 1]:
        i += 1
    return i


@cache
def numba_target_has(feature: str) -> bool:  # LLVM's name of a CPU feature ("avx512bf16"): Numba targets it
    # as prefill_gemm.available() reads it: a target the user set for Numba wins over the host's features (an
    # instruction the target lacks would not compile), a named CPU's features are not known here
    features = os.environ.get("NUMBA_CPU_FEATURES")
    if features is not None:
        return f"+{feature}" in features.split(",")
    if os.environ.get("NUMBA_CPU_NAME", "host") != "host":
        return False
    import llvmlite.binding as llvm

    llvm.initialize_native_target()
    return bool(llvm.get_host_cpu_features().get(feature))


class _BFloat(ir.Type):  # LLVM's `bfloat`, which llvmlite's IR builder has no class for
    def _to_string(self) -> str:
        return "bfloat"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _BFloat)

    def __hash__(self) -> int:
        return hash("bfloat")


F32X16 = ir.VectorType(ir.FloatType(), 16)
I32X16 = ir.VectorType(ir.IntType(32), 16)
BF16X32 = ir.VectorType(_BFloat(), 32)


def dpbf16ps(builder: ir.IRBuilder, acc: ir.Value, a: ir.Value, b: ir.Value) -> ir.Value:
    """AVX512-BF16's `vdpbf16ps` on 512 bits, in IR: <16 x f32> acc, <16 x i32> a, b -> <16 x f32>.

    Each 32-bit lane of a and b holds two bf16 numbers (low half first); lane i of the result is
    acc[i] + a.lo[i]·b.lo[i] + a.hi[i]·b.hi[i]. Intel's pseudocode adds the high pair's product, then the low one's,
    each addition rounded to nearest even in float32 (a product of two bf16 is exact in float32), with denormal
    inputs read as zero and denormal results flushed to zero whatever MXCSR says. (AMD documents no other order or
    rounding; the kernels' tests hold every output to the bound of K such roundings, whatever the order, and pass
    on Zen 5.) The operands go in as <32 x bfloat>, the intrinsic's type since LLVM 17 (a bit cast, no
    instruction).
    """
    fn = cgutils.get_or_insert_function(
        builder.module,
        ir.FunctionType(F32X16, [F32X16, BF16X32, BF16X32]),
        "llvm.x86.avx512bf16.dpbf16ps.512",
    )
    return builder.call(fn, [acc, builder.bitcast(a, BF16X32), builder.bitcast(b, BF16X32)])


def splat_i32x16(builder: ir.IRBuilder, value: ir.Value) -> ir.Value:  # i32 -> <16 x i32>, all lanes value
    undef = ir.Constant(I32X16, ir.Undefined)
    i32 = ir.IntType(32)
    first = builder.insert_element(undef, value, ir.Constant(i32, 0))
    return builder.shuffle_vector(first, undef, ir.Constant(I32X16, [0] * 16))
