"""The "numba" backend: the model's hot kernels compiled for the CPU, reading bf16 weights directly.

Decoding one token is memory-bound: every weight is read once and used for one multiply-add. So the weights stay in
the checkpoint's dtype — BF16 as its uint16 bit patterns (`BF16Weight`), F32 as the read-only memory map — and a
GEMV widens each bf16 row *in registers* (`u32 << 16` reinterpreted as float32, exact) while it streams: 2 bytes
read per weight instead of 4. The kernels, all behind the `Backend` interface of `backends/__init__.py` (same
signatures as the NumPy reference in `tinyqwen/`, which the tests compare them with):

    linear      M ≤ GEMV_MAX_ROWS tokens: parallel bf16 GEMV (each weight row widened once, used for all M rows);
                more tokens (prefill): widen a block of weight rows into a float32 scratch buffer and call BLAS
    rms_norm    one pass per row (also QK-Norm: the same kernel over head_dim)
    apply_rope  one pass, no rotate_half temporaries
    attention   one query position (decode): each kv head is read once for its whole group of query heads;
                longer queries (prefill): blocks of query rows, each block's scores over only the keys its
                mask allows (causal: half the work) by BLAS, with a fused mask + softmax in between
    swiglu      decode: gate and up GEMVs fused with SiLU·mul (x read once, no [ffn] temporaries), then down
    moe_block   only the routed experts run: decode in one fused kernel over all (token, expert) pairs; prefill
                groups the tokens by expert (each expert's weights read once per call)

`matmul_precision` (PyTorch's name for the same choice): "highest" (the default) multiplies in float32 — equal to
the reference within float32 rounding. "medium" rounds the activations entering each product with a bf16 weight to
bf16 (nearest-even) and accumulates in float32, as llama.cpp's bf16 path and PyTorch's bf16 models do: prefill
then runs on the CPU's bf16 matrix units through oneDNN (`backends/onednn.py`), several times the float32 rate,
at the price of ~3 significant digits in the activations (logits moved by ~1e-2 of their size on the tiny bf16
test fixtures; see the tests).

`@njit(cache=True)`: the first call of a kernel compiles it (seconds) and stores the machine code next to this
file, so later processes start fast. Float32 weights (F32 checkpoints) use NumPy's BLAS for the products, in
float32 whatever the precision.
"""

from __future__ import annotations

import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from functools import cache, partial

# Numba's OpenMP threads spin after each parallel kernel by default. On a machine whose cores are shared (other
# processes runnable), a spinning thread holds the core its partner needs, and a 0.3 ms GEMV took 11 ms (measured
# on 2 shared cores). Sleeping at once (passive) costs a wake-up per launch instead, and a decode step launches
# ~200 kernels: Qwen3-0.6B decoded in 92 ms per token passive, 70 ms spinning forever (active). A short spin
# (GOMP_SPINCOUNT iterations, then sleep) gets both: 70 ms quiet, and no worse than passive beside a busy process
# (measured on 2 cores, Sapphire Rapids). Must be set before libgomp starts; values the user set win.
os.environ.setdefault("OMP_WAIT_POLICY", "passive")
os.environ.setdefault("GOMP_SPINCOUNT", "10000")


def _prefer_512_bit_vectors() -> None:
    # LLVM's tuning for AVX-512 Intel CPUs prefers 256-bit vectors (older chips slowed their clock for 512-bit
    # instructions). A GEMV streaming bf16 from memory wants the opposite: with 512-bit vectors each instruction
    # window holds twice the loads in flight, and one core streamed 13.1 GB/s instead of 10.9; Qwen3-0.6B decoded
    # in 74 ms per token instead of 88 (Sapphire Rapids, 2 cores). Numba reads NUMBA_CPU_FEATURES when it is
    # first imported, so this runs before that; a value the user set wins, and an already imported Numba keeps
    # its own (then the kernels are 256-bit: correct, a little slower).
    if "NUMBA_CPU_FEATURES" in os.environ or "NUMBA_CPU_NAME" in os.environ or "numba" in sys.modules:
        return
    features = _host_features()
    if "+avx512f" in features:
        os.environ["NUMBA_CPU_FEATURES"] = ",".join(features) + ",-prefer-256-bit"


def _host_features() -> list[str]:  # LLVM's names for this CPU's features: "+avx512f", "-amx-tile", ...
    import llvmlite.binding as llvm

    llvm.initialize_native_target()
    return llvm.get_host_cpu_features().flatten().split(",")


_prefer_512_bit_vectors()
import numba  # noqa: E402
import numpy as np  # noqa: E402
from llvmlite import ir  # noqa: E402
from numba import njit, prange, types  # noqa: E402
from numba.core import cgutils  # noqa: E402
from numba.extending import intrinsic  # noqa: E402

from tinyqwen import attention as np_attention  # noqa: E402
from tinyqwen.backends import onednn  # noqa: E402
from tinyqwen.backends.contract import Backend, LoadOptions  # noqa: E402
from tinyqwen.bf16 import bf16_to_float32  # noqa: E402
from tinyqwen.moe import route  # noqa: E402

GEMV_MAX_ROWS = 4  # up to this many tokens a product streams the bf16 weights; beyond, widen blocks + BLAS
# float32 scratch for a block of weight rows in the BLAS path: every matrix of Qwen3-0.6B but the lm_head fits
# in one block (one sgemm call, as fast as NumPy's); 4 MiB blocks cost up to 1.7x in BLAS calls here (measured)
WIDEN_BLOCK_BYTES = 16 << 20
MASKED = np_attention.MASKED
# reassociation lets LLVM vectorise the float32 dot products (8 or 16 partial sums, as BLAS does); no other
# fast-math flags, so NaN and inf still propagate as in the NumPy reference. Kernels that divide also take
# error_model="numpy" (x / 0 gives inf as in NumPy, instead of a ZeroDivisionError check per value, which stops
# vectorisation: SiLU·mul over [512, 3072] took 9.4 ms with the check, 2.2 ms without).
FAST = {"reassoc"}
ATTENTION_BLOCK = 128  # query rows per prefill block: its scores are [block, keys] floats, never [T, S]


class BF16Weight:
    """A bf16 weight kept as its uint16 bit patterns (`.bits`); the kernels below read them directly.

    `np.asarray(w)` widens all of it (tests, plots); the embedding lookup widens only the rows it picks (`embed`).
    """

    def __init__(self, bits: np.ndarray):
        if bits.dtype != np.uint16:
            raise TypeError(f"BF16Weight holds uint16 bit patterns, got {bits.dtype}")
        self.bits = bits

    shape = property(lambda self: self.bits.shape)
    ndim = property(lambda self: self.bits.ndim)
    nbytes = property(lambda self: self.bits.nbytes)
    dtype = np.dtype(np.float32)  # what it stands for

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        return bf16_to_float32(self.bits).astype(dtype or np.float32, copy=False)

    def __repr__(self) -> str:
        return f"BF16Weight(shape={self.shape})"


def embed(table, ids: np.ndarray) -> np.ndarray:  # [V, H], [B, T] ids -> [B, T, H] float32
    """The rows of `ids`, widened: a bf16 table is widened only where it is read.

    >>> embed(BF16Weight(np.array([[0x3F80, 0xC000], [0x3FC0, 0x0000]], dtype=np.uint16)), np.array([1, 0]))
    array([[ 1.5,  0. ],
           [ 1. , -2. ]], dtype=float32)
    """
    if isinstance(table, BF16Weight):
        return bf16_to_float32(table.bits[ids])
    return table[ids]


def prepare(w: np.ndarray):
    """Checkpoint tensor -> the backend's weight: bf16 matrices stay bf16, vectors (norm weights) become float32."""
    if w.dtype == np.uint16:
        return BF16Weight(w) if w.ndim >= 2 else bf16_to_float32(w)
    return w  # float32: the read-only memory map, as loaded


# --------------------------------------------------------------------------------------------- kernels


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


@njit(cache=True)
def _to_bf16(f):  # float32 -> bf16 bit pattern, rounded to nearest, ties to even (as torch's .to(bfloat16))
    u = _f32_bits(f)
    if f != f:  # NaN stays NaN, sign kept (rounding its bits could carry into infinity)
        return np.uint16(0xFFC0) if u >> np.uint32(31) else np.uint16(0x7FC0)
    return np.uint16((u + np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16))


@njit(cache=True)
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


# Every parallel kernel below only splits rows into chunks over the threads; the loops that stream the weights
# live in a serial kernel it calls. Numba caches both, but a parallel kernel whose own body holds the loops ran
# ~25% slower loaded from its cache than freshly compiled (the gate/up GEMVs of Qwen3-0.6B: 17-19 ms per token
# instead of 13-15, Sapphire Rapids, 2 cores; numba issue #8085); with the loops in a serial kernel, the cached code
# is as fast as a fresh compile.


@njit(cache=True, inline="always")
def _prefetch_next(
    ws, starts, i, r, hi
):  # prefetch row r + 1 of the stacked row space (weight i holds row r)
    if r + 1 < hi:
        j = i
        while r + 1 >= starts[j + 1]:  # (skipping any weight with no rows)
            j += 1
        _prefetch_weight_row(ws[j][r + 1 - starts[j]])


@njit(cache=True, fastmath=FAST, error_model="numpy")
def _gemv_rows_bf16(x, ws, outs, starts, lo, hi):  # rows lo..hi of the stacked row space of _gemv_many_bf16
    M, K = x.shape
    i = 0
    for r in range(lo, hi):
        while r >= starts[i + 1]:
            i += 1
        w, out, n = ws[i], outs[i], r - starts[i]
        _prefetch_next(ws, starts, i, r, hi)
        for m in range(M):
            acc = np.float32(0.0)
            for k in range(K):
                acc += x[m, k] * _bf16(w[n, k])
            out[m, n] = acc


@njit(parallel=True, cache=True)
def _gemv_many_bf16(x, ws, outs, starts, chunks):  # [M, K] f32, n x [N_i, K] u16, n x [M, N_i] f32 (written)
    # every decode GEMV (n = 1: one weight; n = 3: q, k, v fused). The rows of all n weights as one row space
    # (starts: cumulative row counts), split into chunks over the threads: one parallel launch and one long stream
    # instead of n short ones
    total = starts[-1]
    chunks = min(total, chunks)
    size = (total + chunks - 1) // chunks
    for c in prange(chunks):
        _gemv_rows_bf16(x, ws, outs, starts, c * size, min(total, (c + 1) * size))


@njit(cache=True)
def _widen(w, out):  # [N, K] u16 -> [N, K] f32 (out written)
    # one thread: it alternates with BLAS, whose own threads are still spinning when it starts
    N, K = w.shape
    for n in range(N):
        for k in range(K):
            out[n, k] = _bf16(w[n, k])


@njit(cache=True, fastmath=FAST, error_model="numpy")
def _gate_up_rows_bf16(x, w_gate, w_up, out, lo, hi):  # rows lo..hi of _gate_up_bf16
    M, K = x.shape
    for f in range(lo, hi):
        if f + 1 < hi:
            _prefetch_weight_row(w_gate[f + 1])
            _prefetch_weight_row(w_up[f + 1])
        for m in range(M):
            g = np.float32(0.0)
            u = np.float32(0.0)
            for k in range(K):
                g += x[m, k] * _bf16(w_gate[f, k])
                u += x[m, k] * _bf16(w_up[f, k])
            out[m, f] = _silu(g) * u


@njit(parallel=True, cache=True)
def _gate_up_bf16(
    x, w_gate, w_up, out, chunks
):  # [M, K] f32, [F, K] u16 x2 -> out [M, F]: silu(x Wgᵀ)·(x Wuᵀ)
    F = w_gate.shape[0]
    chunks = min(F, chunks)
    size = (F + chunks - 1) // chunks
    for c in prange(chunks):
        _gate_up_rows_bf16(x, w_gate, w_up, out, c * size, min(F, (c + 1) * size))


# Small kernels run on one thread: a parallel launch costs microseconds, and far more when the cores are shared
# and the other thread waits to be scheduled; these touch kilobytes per decode step.


@njit(cache=True, fastmath=FAST, error_model="numpy")
def _silu_mul(g, u):  # [M, F] x2 -> [M, F]
    out = np.empty_like(g)
    M, F = g.shape
    for m in range(M):
        for f in range(F):
            out[m, f] = _silu(g[m, f]) * u[m, f]
    return out


@njit(cache=True, fastmath=FAST, error_model="numpy")
def _rms_norm(x, weight, eps, out):  # [R, d], [d], scalar -> out [R, d]
    R, d = x.shape
    for r in range(R):
        ss = np.float32(0.0)
        for j in range(d):
            ss += x[r, j] * x[r, j]
        scale = np.float32(1.0) / np.sqrt(ss / np.float32(d) + eps)
        for j in range(d):
            out[r, j] = x[r, j] * scale * weight[j]


@njit(cache=True)
def _rope(x, cos, sin, out):  # [B, H, T, d], [B, T, d] x2 -> out [B, H, T, d]
    B, H, T, d = x.shape
    half = d // 2
    for bh in range(B * H):
        b, h = bh // H, bh % H
        for t in range(T):
            for j in range(half):
                a, c = x[b, h, t, j], x[b, h, t, j + half]
                # exactly the reference's x·cos + rotate_half(x)·sin, with rotate_half(x) = [-x2, x1]
                out[b, h, t, j] = a * cos[b, t, j] - c * sin[b, t, j]
                out[b, h, t, j + half] = c * cos[b, t, j + half] + a * sin[b, t, j + half]


@intrinsic
def _f16(typingctx, u):
    """int16 float16 bit pattern -> float32, in a register (x86's F16C `vcvtph2ps`): exact, like bf16's widening."""

    def codegen(context, builder, signature, args):
        return builder.fpext(builder.bitcast(args[0], ir.HalfType()), ir.FloatType())

    return types.float32(types.int16), codegen


# How a KV cache stores its values is told by the array's Numba type, so that each kernel is compiled for one
# storage and its inner loops carry no branch: float32 as it is, bf16 as uint16 bit patterns, float16 as its int16
# view (Numba has no float16 arrays). A run-time `kind` argument tested per element instead stopped the loops from
# vectorising: a bf16 cache then read at 7 GB/s, slower than a float32 cache of twice the bytes (measured here).


def _kv(x):  # one stored key/value element -> float32 (compiled by the overload below)
    raise NotImplementedError


@numba.extending.overload(_kv)
def _kv_overload(x):
    # a float32 cache compiles to the plain load; a 16-bit one widens in registers, never the whole cache
    if isinstance(x, types.Float):
        return lambda x: x
    if x == types.uint16:
        return lambda x: _bf16(x)
    if x == types.int16:
        return lambda x: _f16(x)
    return None


@njit(cache=True, fastmath=FAST, error_model="numpy")
def _attend_group(q, k, v, mask, out, b, h, S):  # one kv head h of row b and its group of query heads
    # k, v: the whole KV cache [B, Hkv, max_len, d], C-contiguous (so the loops over d vectorise: a sliced view
    # has strides Numba cannot assume, and ran 4x slower); only its first S positions are read
    Hq, d = q.shape[1], q.shape[2]
    Hkv = k.shape[1]
    group = Hq // Hkv
    scale = np.float32(d**-0.5)
    scores = np.empty((group, S), np.float32)
    for s in range(S):  # each key row is read once and used by every query head of the group
        if s + PREFETCH_ROWS < S:
            _prefetch_row(k[b, h, s + PREFETCH_ROWS])
        for g in range(group):
            acc = np.float32(0.0)
            for j in range(d):
                acc += q[b, h * group + g, j] * _kv(k[b, h, s, j])
            scores[g, s] = acc * scale if mask[b, s] else MASKED
    for g in range(group):
        top = scores[g, 0]
        for s in range(1, S):
            top = max(top, scores[g, s])
        total = np.float32(0.0)
        for s in range(S):
            scores[g, s] = _exp(scores[g, s] - top)
            total += scores[g, s]
        for s in range(S):
            scores[g, s] /= total
    acc = np.zeros((group, d), np.float32)
    for s in range(S):  # each value row, likewise, once per group
        if s + PREFETCH_ROWS < S:
            _prefetch_row(v[b, h, s + PREFETCH_ROWS])
        for g in range(group):
            p = scores[g, s]
            for j in range(d):
                acc[g, j] += p * _kv(v[b, h, s, j])
    for g in range(group):
        for j in range(d):
            out[b, h * group + g, j] = acc[g, j]


@njit(cache=True, fastmath=FAST, error_model="numpy")
def _moe_up_rows(
    x, experts, w_gate, w_up, h, p, lo, hi, bf16_inputs
):  # hidden units lo..hi of (token, slot) p
    k, d = experts.shape[1], w_gate.shape[2]
    e, t = experts[p // k, p % k], p // k
    for f in range(lo, hi):
        if f + 1 < hi:
            _prefetch_weight_row(w_gate[e, f + 1])
            _prefetch_weight_row(w_up[e, f + 1])
        g = np.float32(0.0)
        u = np.float32(0.0)
        for j in range(d):
            g += x[t, j] * _bf16(w_gate[e, f, j])
            u += x[t, j] * _bf16(w_up[e, f, j])
        a = _silu(g) * u
        h[p, f] = _bf16(_to_bf16(a)) if bf16_inputs else a


@njit(cache=True, fastmath=FAST, error_model="numpy")
def _moe_down_rows(h, experts, weights, w_down, out, lo, hi):  # output features lo..hi of every token
    N, k = experts.shape
    F = w_down.shape[2]
    for i in range(lo, hi):
        for t in range(N):
            total = np.float32(0.0)
            for s in range(k):  # the token's experts, summed in slot order
                e = experts[t, s]
                if i + 1 < hi:
                    _prefetch_weight_row(w_down[e, i + 1])
                acc = np.float32(0.0)
                for f in range(F):
                    acc += h[t * k + s, f] * _bf16(w_down[e, i, f])
                total += weights[t, s] * acc
            out[t, i] = total


@njit(parallel=True, cache=True)
def _moe_decode_bf16(x, experts, weights, w_gate, w_up, w_down, out, chunks, bf16_inputs):
    # x [N, d] f32, experts/weights [N, k] (routing), w_gate/w_up [E, f, d] u16, w_down [E, d, f] u16 -> out [N, d]
    # (bf16_inputs: x arrives rounded; the hidden activations are rounded here before the down projection)
    # One call for all of a decode step's (token, expert) pairs: the routed experts' rows are spread over the
    # threads together, instead of one small parallel launch per expert.
    N, k = experts.shape
    F, d = w_gate.shape[1], w_gate.shape[2]
    P = N * k
    h = np.empty((P, F), np.float32)
    per = min(F, max(1, chunks // P + 1))  # row chunks per pair
    size = (F + per - 1) // per
    for job in prange(P * per):
        p, c = job // per, job % per
        _moe_up_rows(x, experts, w_gate, w_up, h, p, c * size, min(F, (c + 1) * size), bf16_inputs)
    rows = min(d, chunks)
    size = (d + rows - 1) // rows
    for c in prange(rows):
        _moe_down_rows(h, experts, weights, w_down, out, c * size, min(d, (c + 1) * size))


# short contexts on one thread (a parallel launch costs more than the work), long ones over the kv heads
PARALLEL_ATTENTION_BYTES = 1 << 20  # of keys and values read per step


@njit(cache=True)
def _decode_attention_serial(
    q, k, v, mask, out
):  # [B, Hq, d], [B, Hkv, S, d] x2 (float32, uint16 bf16 or int16 f16 bits), [B, S] bool -> out [B, Hq, d]
    B, Hkv = k.shape[0], k.shape[1]
    for bh in range(B * Hkv):
        _attend_group(q, k, v, mask, out, bh // Hkv, bh % Hkv, mask.shape[1])


@njit(parallel=True, cache=True)
def _decode_attention_parallel(q, k, v, mask, out):  # the same, (row, kv head) pairs spread over threads
    B, Hkv = k.shape[0], k.shape[1]
    for bh in prange(B * Hkv):
        _attend_group(q, k, v, mask, out, bh // Hkv, bh % Hkv, mask.shape[1])


@njit(cache=True, nogil=True, fastmath=FAST, error_model="numpy")
def _masked_softmax(scores, mask, scale):  # [R, S] f32 (in place), [R % rows, S] bool, scalar
    # the reference's softmax(where(mask, scores·scale, MASKED)) in two branch-free passes per row (they
    # vectorise), without its temporaries: a masked entry's exp(MASKED - max) is 0 in both. A row with every key
    # masked (padding) has max = MASKED, so each entry becomes exp(0) = 1: the uniform average, as there.
    R, S = scores.shape
    for r in range(R):
        top = MASKED
        m = r % mask.shape[0]  # the rows of a group's query heads are stacked: they share the mask
        for s in range(S):
            value = scores[r, s] * scale if mask[m, s] else MASKED
            scores[r, s] = value
            top = max(top, value)
        total = np.float32(0.0)
        for s in range(S):
            e = _exp(scores[r, s] - top)
            scores[r, s] = e
            total += e
        for s in range(S):
            scores[r, s] /= total


def _attention_block(q, k, v, rows, out, b, h, t0):  # one (row, kv head, query block) of the prefill
    # scores [group·block, keys] for the group's query heads stacked (k and v read once for all of them) by BLAS,
    # over only the keys some row of the block may see (causal: about half the products), the fused softmax,
    # then BLAS again with v
    group, n, d = q.shape[1] // k.shape[1], rows.shape[0], q.shape[3]
    end = rows.shape[1]
    heads = slice(h * group, (h + 1) * group)
    keys, values = np_attention.widen(k[b, h, :end]), np_attention.widen(v[b, h, :end])  # this block only
    scores = q[b, heads, t0 : t0 + n].reshape(group * n, d) @ keys.T  # [group·block, end]
    _masked_softmax(scores, rows, np.float32(d**-0.5))
    out[b, heads, t0 : t0 + n] = (scores @ values).reshape(group, n, d)


@cache
def _attention_threads():  # (a pool of Python threads, the BLAS thread controller) or None without threadpoolctl
    try:
        from threadpoolctl import ThreadpoolController
    except ImportError:
        return None
    return ThreadPoolExecutor(numba.get_num_threads(), thread_name_prefix="tinyqwen-attention"), (
        ThreadpoolController()
    )


def _prefill_attention(q, k, v, mask):  # [B, Hq, T, d], [B, Hkv, S, d] x2, [B, T, S] bool -> [B, Hq, T, d]
    # Blocks of ATTENTION_BLOCK query rows: memory stays one block of scores, whatever the prompt length.
    # The blocks' small products run on one BLAS thread each, the blocks spread over Python threads (BLAS and the
    # softmax kernel release the GIL). Multi-threaded BLAS on such small products was no faster, and its idle
    # workers spin for ~0.1 s after each call, stealing the cores from the oneDNN / Numba kernels that follow:
    # the MLP after attention took 2.4x longer than alone (measured, 2 cores).
    B, Hq, T, d = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    out = np.empty((B, Hq, T, d), np.float32)
    jobs = []
    for b in range(B):
        for t0 in range(0, T, ATTENTION_BLOCK):
            rows = mask[b, t0 : t0 + ATTENTION_BLOCK]
            seen = np.flatnonzero(rows.any(axis=0))
            # keys up to the last one any row may see; a row that sees none averages all S, as in the reference
            end = int(seen[-1]) + 1 if len(seen) and rows.any(axis=1).all() else S
            rows = np.ascontiguousarray(rows[:, :end])
            jobs += [(rows, b, h, t0) for h in range(Hkv)]
    threads = _attention_threads()
    if threads is None:
        for rows, b, h, t0 in jobs:
            _attention_block(q, k, v, rows, out, b, h, t0)
        return out
    pool, blas = threads
    with blas.limit(limits=1, user_api="blas"):
        # list(): wait for every block, and re-raise the first error of any
        list(pool.map(lambda job: _attention_block(q, k, v, job[0], out, *job[1:]), jobs))
    return out


# --------------------------------------------------------------------------------------------- the interface


def _chunks() -> int:  # work items for a parallel GEMV: several per thread, so a slow thread holds no one up
    return 8 * numba.get_num_threads()


def _rows(x: np.ndarray) -> np.ndarray:  # [..., d] -> [M, d] float32, C-contiguous
    return np.ascontiguousarray(x, dtype=np.float32).reshape(-1, x.shape[-1])


def linear(
    x: np.ndarray, w, bf16_inputs: bool = False
) -> np.ndarray:  # [..., d_in], [d_out, d_in] -> [..., d_out]
    if not isinstance(w, BF16Weight):
        return x @ w.T  # float32 weights: BLAS, as the reference
    x2 = _rows(x)
    bits = w.bits
    N, K = bits.shape
    M = x2.shape[0]
    if bf16_inputs and M > GEMV_MAX_ROWS and onednn.available():  # prefill on the bf16 matrix units
        return onednn.gemm_bf16(round_bf16(x2)[0], bits).reshape(*x.shape[:-1], N)
    if M <= GEMV_MAX_ROWS:  # decode: stream the bf16 weight
        return _gemv(x2, (bits,), bf16_inputs)[0].reshape(*x.shape[:-1], N)
    if bf16_inputs:
        x2 = round_bf16(x2)[1]  # the same products as float32 numbers: bf16 x bf16 is exact in float32
    block = max(1, min(N, WIDEN_BLOCK_BYTES // (4 * K)))
    if block == N:  # prefill: compute-bound, so BLAS's sgemm on the widened weight
        scratch = np.empty((N, K), np.float32)
        _widen(bits, scratch)
        out = x2 @ scratch.T
    else:  # the same, a block of rows at a time: the float32 copy never exceeds WIDEN_BLOCK_BYTES
        out = np.empty((M, N), np.float32)
        scratch = np.empty((block, K), np.float32)
        for start in range(0, N, block):
            stop = min(N, start + block)
            _widen(bits[start:stop], scratch[: stop - start])
            out[:, start:stop] = x2 @ scratch[: stop - start].T  # BLAS sgemm on the widened block
    return out.reshape(*x.shape[:-1], N)


def linears(x: np.ndarray, ws: tuple, bf16_inputs: bool = False) -> tuple:
    # [..., d_in], n x [d_out_i, d_in] -> n x [..., d_out_i]: decode's q, k, v GEMVs in one kernel
    x2 = _rows(x)
    fused = all(isinstance(w, BF16Weight) and w.bits.flags.c_contiguous for w in ws)
    # one Numba type for all (a tuple indexed at run time): all read-only file maps, or all writable arrays
    fused = fused and len({w.bits.flags.writeable for w in ws}) == 1
    if x2.shape[0] > GEMV_MAX_ROWS or not fused:
        return tuple(linear(x, w, bf16_inputs) for w in ws)
    outs = _gemv(x2, tuple(w.bits for w in ws), bf16_inputs)
    return tuple(o.reshape(*x.shape[:-1], o.shape[1]) for o in outs)


@cache
def _starts(
    rows: tuple,
) -> np.ndarray:  # rows of each weight -> their cumulative starts [0, r0, r0 + r1, ...]
    starts = np.cumsum((0, *rows)).astype(np.int64)
    starts.flags.writeable = False  # shared by every call with these shapes
    return starts


def _gemv(x2: np.ndarray, bits: tuple, bf16_inputs: bool) -> tuple:
    # [M ≤ GEMV_MAX_ROWS, K] f32, n x [N_i, K] u16 bf16 weights (one Numba type) -> n x [M, N_i] f32, in one launch
    outs = tuple(np.empty((x2.shape[0], b.shape[0]), np.float32) for b in bits)
    starts = _starts(tuple(b.shape[0] for b in bits))
    # "medium": the bf16-rounded inputs through the same float32 kernel. A bf16 x bf16 product is exact in float32,
    # so these are the products of llama.cpp's bf16 path. (An AVX512-BF16 `vdpbf16ps` kernel, 32 such products per
    # instruction, streamed faster than the float32 one until both prefetched the next row; then it was ~8% slower:
    # a 0.6B step's GEMVs took 51-56 ms against 46-50, so it went.)
    _gemv_many_bf16(round_bf16(x2)[1] if bf16_inputs else x2, bits, outs, starts, _chunks())
    return outs


def rms_norm(x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:  # [..., d], [d] -> [..., d]
    x2 = _rows(x)
    out = np.empty_like(x2)
    _rms_norm(x2, np.asarray(weight, np.float32), np.float32(eps), out)
    return out.reshape(x.shape)


def apply_rope(x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    # [B, H, T, d], [B, T, d], [B, T, d] -> [B, H, T, d]
    out = np.empty(x.shape, np.float32)
    _rope(x.astype(np.float32, copy=False), cos, sin, out)
    return out


def _whole_cache(
    a: np.ndarray,
) -> np.ndarray:  # [B, H, S, d] -> [B, H, S' ≥ S, d] C-contiguous, a = its [:, :, :S]
    # The model passes the cache's first S positions, a view of the whole preallocated cache: hand the kernel that
    # whole (contiguous) array instead, without a copy. Anything else is copied once.
    base = a.base
    if (
        isinstance(base, np.ndarray)
        and base.flags.c_contiguous
        and base.dtype == a.dtype
        and base.ndim == 4
        and base.shape[:2] == a.shape[:2]
        and base.shape[3] == a.shape[3]
        and base.strides == a.strides
        and base.ctypes.data == a.ctypes.data
    ):
        return base
    return np.ascontiguousarray(a)


def attention(q: np.ndarray, k: np.ndarray, v: np.ndarray, mask: np.ndarray) -> np.ndarray:
    # [B, Hq, T, d], [B, Hkv, S, d], [B, Hkv, S, d] (float32, or a bf16 / float16 KV cache), [B, T, S] bool
    # -> [B, Hq, T, d]
    B, Hq, T, d = q.shape
    if T != 1:
        return _prefill_attention(q, k, v, mask)
    # a narrow cache is read as it is stored: each element widened in registers (bf16 as uint16 bit patterns;
    # float16 passed as its int16 view, since Numba has no float16 arrays: see _kv)
    nbytes = k.nbytes
    k, v = _whole_cache(k), _whole_cache(v)
    if k.dtype == np.float16:
        k, v = k.view(np.int16), v.view(np.int16)
    out = np.empty((B, Hq, d), np.float32)
    kernel = _decode_attention_parallel if 2 * nbytes > PARALLEL_ATTENTION_BYTES else _decode_attention_serial
    kernel(np.ascontiguousarray(q[:, :, 0], np.float32), k, v, np.ascontiguousarray(mask[:, 0]), out)
    return out.reshape(B, Hq, 1, d)


def swiglu(x: np.ndarray, w_gate, w_up, w_down, bf16_inputs: bool = False) -> np.ndarray:
    # [..., d], [f, d], [f, d], [d, f] -> [..., d]
    x2 = _rows(x)
    if isinstance(w_gate, BF16Weight) and isinstance(w_up, BF16Weight) and x2.shape[0] <= GEMV_MAX_ROWS:
        h = np.empty((x2.shape[0], w_gate.shape[0]), np.float32)
        _gate_up_bf16(round_bf16(x2)[1] if bf16_inputs else x2, w_gate.bits, w_up.bits, h, _chunks())
    else:
        h = _silu_mul(linear(x2, w_gate, bf16_inputs), linear(x2, w_up, bf16_inputs))
    return linear(h, w_down, bf16_inputs).reshape(x.shape)


def _expert(w, e: int):  # one expert's [rows, cols] weight out of the stacked [E, rows, cols]
    return BF16Weight(w.bits[e]) if isinstance(w, BF16Weight) else w[e]


def moe_block(x, w_router, w_gate, w_up, w_down, top_k: int, norm_topk_prob: bool, bf16_inputs: bool = False):
    # [N, d], [E, d], [E, f, d], [E, f, d], [E, d, f] -> output [N, d], router logits [N, E]
    router_logits = linear(x, w_router, bf16_inputs)
    weights, experts = route(router_logits, top_k, norm_topk_prob)  # the reference's routing, ties included
    if isinstance(w_gate, BF16Weight) and x.shape[0] <= GEMV_MAX_ROWS:  # decode: one fused kernel
        out = np.empty(x.shape, np.float32)
        x2 = round_bf16(_rows(x))[1] if bf16_inputs else _rows(x)
        w32 = weights.astype(np.float32)
        _moe_decode_bf16(x2, experts, w32, w_gate.bits, w_up.bits, w_down.bits, out, _chunks(), bf16_inputs)
        return out, router_logits
    out = np.zeros(x.shape, np.float32)
    # only the routed experts run; each runs once, on all the tokens that chose it (its weights read once)
    for e in np.unique(experts):
        token, slot = np.nonzero(experts == e)
        y = swiglu(x[token], _expert(w_gate, e), _expert(w_up, e), _expert(w_down, e), bf16_inputs)
        out[token] += y * weights[token, slot, None]  # a token picks an expert at most once: no repeats
    return out, router_logits


def backend(matmul_precision: str = "highest") -> Backend:
    """The numba backend; `matmul_precision` "highest" (float32 products) or "medium" (bf16 inputs, see above)."""
    options = LoadOptions(keep_bf16=True, bf16_in_memory=True, matmul_precision=matmul_precision)
    bf16_inputs = matmul_precision == "medium"
    return Backend(
        name="numba",
        linear=partial(linear, bf16_inputs=bf16_inputs),
        linears=partial(linears, bf16_inputs=bf16_inputs),
        rms_norm=rms_norm,
        apply_rope=apply_rope,
        attention=attention,
        swiglu=partial(swiglu, bf16_inputs=bf16_inputs),
        moe_block=partial(moe_block, bf16_inputs=bf16_inputs),
        embed=embed,
        prepare=prepare,
        to_numpy=np.asarray,
        options=options,
    )


class compile_clock:  # noqa: N801 (used like a function)
    """Seconds Numba spends compiling from now on (its "numba:compile" events; nested compiles counted once).

    The benchmark's numba engine reports it: the first call's compile time, never hidden in tokens per second.
    """

    def __init__(self):
        from numba.core import event

        self.total, self._depth, self._start = 0.0, 0, 0.0
        clock = self

        class Listener(event.Listener):
            def on_start(self, ev):
                if clock._depth == 0:
                    clock._start = time.perf_counter()
                clock._depth += 1

            def on_end(self, ev):
                clock._depth -= 1
                if clock._depth == 0:
                    clock.total += time.perf_counter() - clock._start

        event.register("numba:compile", Listener())
