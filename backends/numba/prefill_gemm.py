"""Prefill's bf16 products on AVX-512: token panels, widened weight blocks, a 12 x 32 micro-kernel in LLVM IR.

    x [M, K] f32  --once per call-->  xt [P, K, 32]      P = ceil(M / 32) panels of 32 token rows, k-major
    W [N, K] bf16 --a block of R rows at a time--> buf [R, K] f32   (widened once, stays in L2)
    for each panel p, for 12 rows of buf:   acc[12, 32] = buf[r:r+12] · xt[p]ᵀ     24 AVX-512 accumulators

Why not BLAS: the OpenBLAS that NumPy's wheel carries picks its kernels by CPU model, and on a CPU it does not know
(this AMD EPYC, Zen 5, family 26) it falls back to its AVX2 "Haswell" kernels: 8 lanes per FMA where the CPU has
16. Measured on its shapes ([256, 1024] x [1024, 1024 | 2048 | 3072], [256, 3072] x [3072, 1024], one thread):
OpenBLAS as loaded 56-70 GFLOP/s; the same library forced to its AVX-512 kernels (OPENBLAS_CORETYPE=SkylakeX, which
only the environment of a new process can set) 100-199 GFLOP/s. This kernel is batch_gemm.py's outer product (the
decode-step panels) on 512-bit vectors: per k, two vector loads of 32 token values, twelve weights broadcast from
the widened block, 24 FMAs into 12 x 32 sums that stay in registers over the whole of k (24 accumulators + 2 x
vectors + 1 broadcast = 27 of AVX-512's 32 registers). LLVM's vectorisers will not build that from scalar Numba
code, so `_mk12x32` writes it in IR. It runs only where Numba compiles for AVX-512 (`available()`); elsewhere
prefill keeps BLAS. (The same panels at AVX2 width, 6 weight rows x 16 tokens on 8-lane vectors, ran 1.1-1.2x
OpenBLAS's Haswell kernels on this CPU, one thread, CPU time; never measured on an AVX2-only CPU, so not used there.)

Fused products: q, k and v as one stacked row space (one launch, one split over the threads); gate and up with
their rows interleaved in the widened block (g_f, u_f, g_f+1, ...), so each micro-kernel call gives six gate/up
pairs and SiLU(g)·u goes straight into the panels hp [P, F, 32] that the down projection reads.

Quantized weights (q8_0, Q4_K, Q6_K; linear.QUANT_PREFILL_PANELS): the same panels and micro-kernel, the block
dequantized into the buffer instead of widened (`matmul_quant`). 128-token prefill of Qwen3-0.6B, 2 threads, one
process interleaved (benchmarks/bench_quant_prefill.py): q8_0 1.6-1.9x the dequantize + OpenBLAS road (246-283
against 135-170 tok/s); Q4_K_M 1.36-1.40x the int8 tiles (343-355 against 249-259 tok/s), so on AVX-512 every
format takes the panels (linear.INT8_PREFILL). The Q6_K blocks dequantize in their own loop (`_dequantize_q6_k_row`).

Numerics: each output is one float32 FMA chain over k in order (llvm.fma: one rounding per step), so a row's result
depends neither on the other rows nor on its panel; it differs from BLAS's blocked sums by float32 rounding only
(tests/test_prefill_gemm.py: within 1e-5 of the output's size against float64 sums). Padding rows of the last
panel are zeros, computed and never stored.

matmul_precision="medium" where Numba's target has AVX512-BF16 (`available_bf16()`; linear.PREFILL_DPBF16): the
same panels and blocks on bf16 pairs (`matmul_bf16`, `swiglu_bf16`). x is rounded to the nearest bf16 (ties to
even) and packed as pairs [P, K/2, 32] u32; the weight block is the bf16 rows copied as they are (half the bytes
of a widened one, no widening); `_mk12x32_bf16` is _mk12x32 with each FMA a `vdpbf16ps`: per pair of k, 16 outputs
x 2 products each (32 per instruction where an FMA does 16). The MLP as today's panels: gate/up rows interleaved in
the block, SiLU(g)·u rounded to bf16 (as "medium" rounds every input of a bf16 product) straight into the pair
panels the down projection reads.
Numerics: a bf16 x bf16 product is exact in float32 (8 x 8 significant bits), so the inputs are exactly those
of llama.cpp's bf16 path (ggml rounds src1 to bf16 the same way) and of the float32 road on rounded x. vdpbf16ps
adds the pair's two products to the accumulator one after the other, each addition rounded to nearest even in
float32 (Intel's pseudocode): an output is a chain of K float32 additions, as the FMA chain is, in another
order; |error| <= K·2⁻²⁴ · Σ|x_k·w_k| (tests/test_prefill_gemm.py holds every output to that against float64 sums
of the rounded inputs). vdpbf16ps also ignores MXCSR: denormal inputs are read as zero and denormal sums flushed
to zero. bf16 has float32's exponent range, so that touches values below 2⁻¹²⁶ ≈ 1.2e-38 only: an x or weight
that small counts as 0, and a partial sum that small becomes 0 (an absolute error of at most 2⁻¹²⁶ per
addition), nothing a model's activations come near. The logits of the test models move by ~1e-2 of their size
from "highest" (the rounding of the inputs; tinyqwen.load_model documents it), and by ~4e-3 from the other
"medium" road (the float32 panels on rounded x; the order of the sums, and an h rounded to the neighbouring bf16
where it lies next to a rounding boundary).
Speed (AMD EPYC Zen 5, a machine shared with other work, load 2-3.5; one process, interleaved, best of N): one
thread, Qwen3-0.6B's shapes, x rounded into the float32 panels against the vdpbf16ps panels, GFLOP/s: 256 tokens
q/k/v 201 -> 321, o_proj 192 -> 335, gate/up 207 -> 347, down 191 -> 349 (1.59-1.82x); 128 tokens 178-190 ->
293-315 (1.56-1.76x). Two threads (benchmarks/bench_prefill.py --medium, best of 5): a whole 256-token prefill
1.40-1.48x "highest"'s time, 128 tokens 1.69x; a serving step (16 decode rows + a 256-token chunk) 1.42-1.57x.

One concept: prefill's products on AVX-512 token panels, in the number formats the panels take (float32 x with
widened bf16 or dequantized blocks; "medium"'s bf16 pairs on vdpbf16ps): one panel layout, one job plan over the
threads, one micro-kernel shape in two instructions.
"""

from __future__ import annotations

import os
from functools import cache

import numba
import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic

from tinyqwen.backends.numba import quant
from tinyqwen.backends.numba.intrinsics import (
    F32X16,
    I32X16,
    _bf16,
    _silu,
    _to_bf16,
    _weight_of,
    dpbf16ps,
    numba_target_has,
    splat_i32x16,
)

PANEL = 32  # token rows per panel: two AVX-512 vectors of float32
LANES = 16
NR = 12  # weight rows per micro-kernel call (12 x 2 accumulators)
UNROLL = 4  # steps of k per pass of the micro-kernel's loop (K must be a multiple)
CHUNKS_PER_THREAD = 2  # work items of a product per thread (each widens its own weight rows)
BUF_BYTES = 256 << 10  # the widened block of weight rows: with a panel (K x 128 bytes) it stays in a 1 MiB L2


@intrinsic
def _mk12x32(typingctx, xt, p, buf, r0, acc):
    """acc[i, :] = Σ_k buf[r0 + i, k] · xt[p, k, :] for i < 12: [P, K, 32] f32, [R, K] f32 -> acc [12, 32] f32.

    One loop over k with 24 <16 x float> accumulators as phi nodes: per k, xt[p, k, 0:16] and [16:32] loaded, each
    of the twelve weights broadcast and multiplied into both (llvm.fma). All arrays C-contiguous, K a multiple of
    UNROLL, r0 + 12 <= R.
    """

    def codegen(context, builder, signature, args):
        xa = context.make_array(signature.args[0])(context, builder, args[0])
        ba = context.make_array(signature.args[2])(context, builder, args[2])
        aa = context.make_array(signature.args[4])(context, builder, args[4])
        i64, i32, f32 = ir.IntType(64), ir.IntType(32), ir.FloatType()
        vec = ir.VectorType(f32, LANES)

        def const(v):
            return ir.Constant(i64, v)

        K = builder.extract_value(xa.shape, 1)
        row_len = builder.extract_value(ba.shape, 1)
        x_base = builder.gep(xa.data, [builder.mul(args[1], builder.mul(K, const(PANEL)))])
        rows = [
            builder.gep(ba.data, [builder.mul(builder.add(args[3], const(i)), row_len)]) for i in range(NR)
        ]
        fma = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(vec, [vec, vec, vec]), f"llvm.fma.v{LANES}f32"
        )
        zero = ir.Constant(vec, [0.0] * LANES)
        undef = ir.Constant(vec, ir.Undefined)
        splat = ir.Constant(ir.VectorType(i32, LANES), [0] * LANES)
        before = builder.block
        loop = builder.append_basic_block("mk12x32.loop")
        done = builder.append_basic_block("mk12x32.done")
        builder.branch(loop)
        builder.position_at_end(loop)
        k = builder.phi(i64)
        sums = [builder.phi(vec) for _ in range(2 * NR)]
        k.add_incoming(const(0), before)
        for s in sums:
            s.add_incoming(zero, before)
        cur = list(sums)
        for u in range(UNROLL):
            ku = builder.add(k, const(u))
            x_row = builder.gep(x_base, [builder.mul(ku, const(PANEL))])
            x0 = builder.load(builder.bitcast(x_row, vec.as_pointer()), align=4)
            x1 = builder.load(builder.bitcast(builder.gep(x_row, [const(LANES)]), vec.as_pointer()), align=4)
            for i in range(NR):
                w = builder.load(builder.gep(rows[i], [ku]), align=4)
                wide = builder.shuffle_vector(
                    builder.insert_element(undef, w, ir.Constant(i32, 0)), undef, splat
                )
                cur[2 * i] = builder.call(fma, [wide, x0, cur[2 * i]])
                cur[2 * i + 1] = builder.call(fma, [wide, x1, cur[2 * i + 1]])
        k_next = builder.add(k, const(UNROLL))
        end = builder.block
        k.add_incoming(k_next, end)
        for s, n in zip(sums, cur, strict=True):
            s.add_incoming(n, end)
        builder.cbranch(builder.icmp_signed("<", k_next, K), loop, done)
        builder.position_at_end(done)
        for j, n in enumerate(cur):
            address = builder.gep(aa.data, [const(LANES * j)])
            builder.store(n, builder.bitcast(address, vec.as_pointer()), align=4)
        return context.get_dummy_value()

    return types.void(xt, p, buf, r0, acc), codegen


@njit(cache=True, error_model="numpy")
def _rows_into(xt, M, ws, outs, starts, lo, hi, R):  # stacked rows lo..hi of n x [N_i, K] u16 -> outs
    P, K = xt.shape[0], xt.shape[1]
    buf = np.empty((R, K), np.float32)
    acc = np.empty((NR, PANEL), np.float32)
    js, cols = np.empty(NR, np.int64), np.empty(NR, np.int64)  # each acc row's weight and column there
    for b in range(lo, hi, R):
        n = min(hi, b + R) - b
        i = _weight_of(starts, 0, b)
        j = i
        for r in range(n):  # widen the block: contiguous rows, a vectorised loop
            j = _weight_of(starts, j, b + r)
            w = ws[j][b + r - starts[j]]
            for k in range(K):
                buf[r, k] = _bf16(w[k])
        for p in range(P):  # panel outer: its 32 x K values stay in cache while the block's rows stream by
            m_hi = min(M, (p + 1) * PANEL)
            for r in range(0, n, NR):
                _mk12x32(xt, p, buf, r, acc)
                T = min(NR, n - r)
                j = i
                for t in range(T):
                    j = js[t] = _weight_of(starts, j, b + r + t)
                    cols[t] = b + r + t - starts[j]
                # token rows outer: each out row takes T neighbouring columns. Columns outer (a store per row
                # 4-16 KiB apart, 32 times per column) took 3.4 ms of a 7.3 ms [256, 1024] x [2048, 1024]
                # product; this order 0.4-0.8 ms (one thread, CPU time)
                if js[0] == js[T - 1]:
                    o, c0 = outs[js[0]], cols[0]
                    for m in range(p * PANEL, m_hi):
                        for t in range(T):
                            o[m, c0 + t] = acc[t, m - p * PANEL]
                else:  # a group spanning two weights
                    for m in range(p * PANEL, m_hi):
                        for t in range(T):
                            outs[js[t]][m, cols[t]] = acc[t, m - p * PANEL]


@njit(cache=True, error_model="numpy", inline="always")
def _dequantize_q6_k_row(b, i8, out):  # one Q6_K row: uint8 bytes (and as int8) -> out [K] f32
    # quant._dequantize_row's values, bit for bit (d·sc·q: d·sc and sc·q are exact in float32, so any order rounds
    # once, to the same number), with each 16-value group's scales hoisted out of the loop over its values: that loop
    # vectorises. quant.py's, which picks the scale per value, dequantized [1024, 3072] in 2.03 ms against Q4_K's
    # 0.36 ms for as many values, and the Q6_K down projection of a 128-token prefill took 4.56 ms on the panels
    # against 2.81 ms for the same shape in bf16 (2 threads, one process, AMD EPYC Zen 5)
    for blk in range(out.shape[0] // 256):
        o = blk * 210
        d = quant._half(b, o + 208)
        for h in range(2):  # two halves of 128 values
            ql, qh, sc, y = o + 64 * h, o + 128 + 32 * h, o + 192 + 8 * h, blk * 256 + 128 * h
            for s in range(2):
                d0, d1 = d * np.float32(i8[sc + s]), d * np.float32(i8[sc + s + 2])
                d2, d3 = d * np.float32(i8[sc + s + 4]), d * np.float32(i8[sc + s + 6])
                for l in range(16 * s, 16 * s + 16):
                    lo, hi, top = np.int32(b[ql + l]), np.int32(b[ql + 32 + l]), np.int32(b[qh + l])
                    out[y + l] = d0 * np.float32(((lo & 15) | ((top & 3) << 4)) - 32)
                    out[y + 32 + l] = d1 * np.float32(((hi & 15) | (((top >> 2) & 3) << 4)) - 32)
                    out[y + 64 + l] = d2 * np.float32(((lo >> 4) | (((top >> 4) & 3) << 4)) - 32)
                    out[y + 96 + l] = d3 * np.float32(((hi >> 4) | (((top >> 6) & 3) << 4)) - 32)


@njit(cache=True, error_model="numpy")
def dequantize_rows(kind, b, i8, lo, out):  # rows lo.. of [N, bytes] u8 (and as int8) -> out [R, K] f32
    for r in range(out.shape[0]):
        if kind == quant.Q6_K:
            _dequantize_q6_k_row(b[lo + r], i8[lo + r], out[r])
        else:
            quant._dequantize_row(kind, b[lo + r], i8[lo + r], out[r])


@njit(cache=True, error_model="numpy")
def _quant_rows_into(xt, M, kind, b, i8, out, lo, hi, R):  # rows lo..hi of quantized [N, K] -> out [M, N]
    # _rows_into with the block dequantized (quant.py's exact per-row kernel) instead of widened from bf16
    P, K = xt.shape[0], xt.shape[1]
    buf = np.empty((R, K), np.float32)
    acc = np.empty((NR, PANEL), np.float32)
    for s in range(lo, hi, R):
        n = min(hi, s + R) - s
        dequantize_rows(kind, b, i8, s, buf[:n])
        for p in range(P):
            m_hi = min(M, (p + 1) * PANEL)
            for r in range(0, n, NR):
                _mk12x32(xt, p, buf, r, acc)
                T = min(NR, n - r)
                c0 = s + r
                for m in range(p * PANEL, m_hi):
                    for t in range(T):
                        out[m, c0 + t] = acc[t, m - p * PANEL]


@njit(cache=True, error_model="numpy")
def _gate_up_into(xt, w_gate, w_up, hp, lo, hi, R):  # rows lo..hi of silu(x Wgᵀ)·(x Wuᵀ) -> hp [P, F, 32]
    P, K = xt.shape[0], xt.shape[1]
    buf = np.empty((R, K), np.float32)  # gate and up rows interleaved: R / 2 pairs
    acc = np.empty((NR, PANEL), np.float32)
    pairs = R // 2
    for b in range(lo, hi, pairs):
        n = min(hi, b + pairs) - b
        for f in range(n):
            for k in range(K):
                buf[2 * f, k] = _bf16(w_gate[b + f, k])
                buf[2 * f + 1, k] = _bf16(w_up[b + f, k])
        for p in range(P):
            for r in range(0, 2 * n, NR):
                _mk12x32(xt, p, buf, r, acc)
                for t in range(min(NR // 2, n - r // 2)):
                    f = b + r // 2 + t
                    for m in range(PANEL):
                        hp[p, f, m] = _silu(acc[2 * t, m]) * acc[2 * t + 1, m]


@njit(cache=True, inline="always")
def _chunk_rows(total, chunks, multiple):  # rows per work item: total over chunks, rounded up to a multiple
    size = (total + chunks - 1) // chunks
    return size + (multiple - size % multiple) % multiple


@njit(parallel=True, cache=True, nogil=True)
def matmul_many(xt, M, ws, outs, starts, chunks, R):
    # [P, K, 32] f32 panels of x [M, K], n x [N_i, K] u16 -> n x [M, N_i] f32 (written): q/k/v in one launch
    total = starts[-1]
    size = _chunk_rows(total, min(total, chunks), NR)
    for c in prange((total + size - 1) // size):
        _rows_into(xt, M, ws, outs, starts, c * size, min(total, (c + 1) * size), R)


@njit(parallel=True, cache=True, nogil=True)
def matmul_quant_rows(xt, M, kind, b, i8, out, chunks, R):
    # [P, K, 32] f32 panels of x [M, K], a quantized weight's rows [N, bytes] u8 (and as int8) -> out [M, N] f32
    total = b.shape[0]
    size = _chunk_rows(total, min(total, chunks), NR)
    for c in prange((total + size - 1) // size):
        _quant_rows_into(xt, M, kind, b, i8, out, c * size, min(total, (c + 1) * size), R)


@njit(parallel=True, cache=True, nogil=True)
def swiglu_panels(xt, M, w_gate, w_up, w_down, hp, out, starts, chunks, R, R_down):
    # the MLP in one launch: gate/up into the panels hp [P, F, 32], then down from them into out [M, d]
    F = w_gate.shape[0]
    size = _chunk_rows(F, min(F, chunks), NR // 2)
    for c in prange((F + size - 1) // size):
        _gate_up_into(xt, w_gate, w_up, hp, c * size, min(F, (c + 1) * size), R)
    total = w_down.shape[0]
    size2 = _chunk_rows(total, min(total, chunks), NR)
    for c in prange((total + size2 - 1) // size2):
        _rows_into(hp, M, (w_down,), (out,), starts, c * size2, min(total, (c + 1) * size2), R_down)


@njit(cache=True, nogil=True)
def _pack(x, xt):  # [M, K] f32 -> xt [P, K, 32] (the rows past M: zeros)
    # row by row (contiguous reads, stores 128 bytes apart): 0.14 ms for [256, 1024], against 0.21 ms reading
    # down the columns (one thread, CPU time)
    M, K = x.shape
    for m in range(xt.shape[0] * PANEL):
        p, t = m // PANEL, m % PANEL
        if m < M:
            for k in range(K):
                xt[p, k, t] = x[m, k]
        else:
            for k in range(K):
                xt[p, k, t] = np.float32(0.0)


def panels(x2: np.ndarray) -> np.ndarray:  # [M, K] f32 -> [ceil(M / 32), K, 32] f32
    M, K = x2.shape
    xt = np.empty((-(-M // PANEL), K, PANEL), np.float32)
    _pack(x2, xt)
    return xt


def _starts(rows: tuple) -> np.ndarray:  # rows of each weight -> cumulative starts [0, r0, r0 + r1, ...]
    return np.cumsum((0, *rows)).astype(np.int64)


def _chunks() -> int:
    return CHUNKS_PER_THREAD * numba.get_num_threads()


def matmul(x2: np.ndarray, bits: tuple) -> tuple:  # [M, K] f32, n x [N_i, K] u16 -> n x [M, N_i]
    M, K = x2.shape
    outs = tuple(np.empty((M, b.shape[0]), np.float32) for b in bits)
    starts = _starts(tuple(b.shape[0] for b in bits))
    matmul_many(panels(x2), M, bits, outs, starts, _chunks(), block_rows(K))
    return outs


def matmul_quant(x2: np.ndarray, w) -> np.ndarray:  # [M, K] f32, a 2-D QuantWeight [N, K] -> [M, N] f32
    M, K = x2.shape
    out = np.empty((M, w.shape[0]), np.float32)
    matmul_quant_rows(panels(x2), M, w.kind, w.data, w.data8, out, _chunks(), block_rows(K))
    return out


def swiglu(x2: np.ndarray, w_gate: np.ndarray, w_up: np.ndarray, w_down: np.ndarray) -> np.ndarray:
    # [M, d] f32, [F, d] u16 x2, [d, F] u16 -> [M, d] f32: the MLP in one launch
    xt = panels(x2)
    F = w_gate.shape[0]
    hp = np.empty((xt.shape[0], F, PANEL), np.float32)
    out = np.empty(x2.shape, np.float32)
    swiglu_panels(xt, x2.shape[0], w_gate, w_up, w_down, hp, out, _starts((w_down.shape[0],)), _chunks(),
                  block_rows(x2.shape[1]), block_rows(F))  # fmt: skip
    return out


def block_rows(K: int) -> int:  # rows of a widened block: a multiple of NR within BUF_BYTES
    return max(NR, BUF_BYTES // (4 * K) // NR * NR)


@cache
def available() -> bool:  # Numba compiles for AVX-512: 32 vector registers of 16 floats
    # (a target the user set for Numba wins over the host's features: 16-float vectors on an AVX2 target would be
    # split in two, and the 48 halves of the accumulators spill)
    features = os.environ.get("NUMBA_CPU_FEATURES")
    if features is not None:
        return "+avx512f" in features.split(",")
    if os.environ.get("NUMBA_CPU_NAME", "host") != "host":
        return False  # a named CPU's features are not known here: BLAS, as before
    import llvmlite.binding as llvm

    llvm.initialize_native_target()
    return bool(llvm.get_host_cpu_features().get("avx512f"))


def fits(*ks: int) -> bool:  # inner sizes the micro-kernel's unrolled loop takes
    return all(k > 0 and k % UNROLL == 0 for k in ks)


def usable(bits: tuple, *ks: int) -> bool:  # bf16 weights [N_i, K] and inner sizes ks the kernels take
    return (
        available()
        and fits(bits[0].shape[1], *ks)
        and all(b.flags.c_contiguous for b in bits)
        and len({b.flags.writeable for b in bits}) == 1  # one Numba type for the tuple indexed at run time
    )


# --- matmul_precision="medium" on AVX512-BF16: the same panels, bf16 pairs into vdpbf16ps ---------------------------
#
#     x [M, K] f32 --rounded to bf16, once per call--> xt [P, K/2, 32] u32   (lane t of pair kk: x[t, 2kk], x[t, 2kk+1])
#     W [N, K] bf16 --a block of R rows, copied as they are--> buf [R, K/2] u32 (no widening: half the bytes)
#     for each panel p, 12 rows of buf: acc[12, 32] += vdpbf16ps(xt[p, kk], broadcast(buf[r, kk]))  per pair kk
#
# One instruction takes 16 outputs x 2 k (32 products) where an FMA takes 16 x 1, with the loads the same per
# instruction (two x vectors and twelve weight broadcasts per pair of k instead of per k).


@intrinsic
def _mk12x32_bf16(typingctx, xt, p, buf, r0, acc):
    """acc[i, :] = Σ_kk vdpbf16ps(buf[r0 + i, kk], xt[p, kk, :]) for i < 12: [P, K2, 32] u32, [R, K2] u32 -> acc
    [12, 32] f32 (K2 = K / 2 pairs of bf16). _mk12x32's loop with each FMA a vdpbf16ps over a pair of k. All arrays
    C-contiguous, K2 a multiple of UNROLL, r0 + 12 <= R.
    """

    def codegen(context, builder, signature, args):
        xa = context.make_array(signature.args[0])(context, builder, args[0])
        ba = context.make_array(signature.args[2])(context, builder, args[2])
        aa = context.make_array(signature.args[4])(context, builder, args[4])
        i64 = ir.IntType(64)

        def const(v):
            return ir.Constant(i64, v)

        K2 = builder.extract_value(xa.shape, 1)
        row_len = builder.extract_value(ba.shape, 1)
        x_base = builder.gep(xa.data, [builder.mul(args[1], builder.mul(K2, const(PANEL)))])
        rows = [
            builder.gep(ba.data, [builder.mul(builder.add(args[3], const(i)), row_len)]) for i in range(NR)
        ]
        zero = ir.Constant(F32X16, [0.0] * LANES)
        before = builder.block
        loop = builder.append_basic_block("mk12x32bf16.loop")
        done = builder.append_basic_block("mk12x32bf16.done")
        builder.branch(loop)
        builder.position_at_end(loop)
        k = builder.phi(i64)
        sums = [builder.phi(F32X16) for _ in range(2 * NR)]
        k.add_incoming(const(0), before)
        for s in sums:
            s.add_incoming(zero, before)
        cur = list(sums)
        for u in range(UNROLL):
            ku = builder.add(k, const(u))
            x_row = builder.gep(x_base, [builder.mul(ku, const(PANEL))])
            x0 = builder.load(builder.bitcast(x_row, I32X16.as_pointer()), align=4)
            x1 = builder.load(
                builder.bitcast(builder.gep(x_row, [const(LANES)]), I32X16.as_pointer()), align=4
            )
            for i in range(NR):
                w = splat_i32x16(builder, builder.load(builder.gep(rows[i], [ku]), align=4))
                cur[2 * i] = dpbf16ps(builder, cur[2 * i], x0, w)
                cur[2 * i + 1] = dpbf16ps(builder, cur[2 * i + 1], x1, w)
        k_next = builder.add(k, const(UNROLL))
        end = builder.block
        k.add_incoming(k_next, end)
        for s, n in zip(sums, cur, strict=True):
            s.add_incoming(n, end)
        builder.cbranch(builder.icmp_signed("<", k_next, K2), loop, done)
        builder.position_at_end(done)
        for j, n in enumerate(cur):
            address = builder.gep(aa.data, [const(LANES * j)])
            builder.store(n, builder.bitcast(address, F32X16.as_pointer()), align=4)
        return context.get_dummy_value()

    return types.void(xt, p, buf, r0, acc), codegen


@njit(cache=True, error_model="numpy")
def _rows_into_bf16(xt, M, ws, outs, starts, lo, hi, R):  # _rows_into on pairs
    # xt [P, K2, 32] u32, ws n x [N_i, K2] u32 -> outs n x [M, N_i] f32
    P, K2 = xt.shape[0], xt.shape[1]
    buf = np.empty((R, K2), np.uint32)
    acc = np.empty((NR, PANEL), np.float32)
    js, cols = np.empty(NR, np.int64), np.empty(NR, np.int64)
    for b in range(lo, hi, R):
        n = min(hi, b + R) - b
        i = _weight_of(starts, 0, b)
        j = i
        for r in range(n):  # copy the block (a stacked block may span two weights): bf16 pairs as they are
            j = _weight_of(starts, j, b + r)
            w = ws[j][b + r - starts[j]]
            for k in range(K2):
                buf[r, k] = w[k]
        for p in range(P):
            m_hi = min(M, (p + 1) * PANEL)
            for r in range(0, n, NR):
                _mk12x32_bf16(xt, p, buf, r, acc)
                T = min(NR, n - r)
                j = i
                for t in range(T):
                    j = js[t] = _weight_of(starts, j, b + r + t)
                    cols[t] = b + r + t - starts[j]
                if js[0] == js[T - 1]:
                    o, c0 = outs[js[0]], cols[0]
                    for m in range(p * PANEL, m_hi):
                        for t in range(T):
                            o[m, c0 + t] = acc[t, m - p * PANEL]
                else:
                    for m in range(p * PANEL, m_hi):
                        for t in range(T):
                            outs[js[t]][m, cols[t]] = acc[t, m - p * PANEL]


@njit(cache=True, error_model="numpy")
def _gate_up_into_bf16(xt, w_gate, w_up, hp, lo, hi, R):
    # rows lo..hi of silu(x Wgᵀ)·(x Wuᵀ), rounded to bf16 -> hp [P, F/2, 32] u32: the pairs the down projection
    # reads (hp[p, f // 2, m] holds h[32p + m, f] in its low half for even f, its high half for odd f); w_gate,
    # w_up [F, K2] u32, lo and hi even
    P, K2 = xt.shape[0], xt.shape[1]
    buf = np.empty((R, K2), np.uint32)  # gate and up rows interleaved: R / 2 pairs
    acc = np.empty((NR, PANEL), np.float32)
    pairs = R // 2
    for b in range(lo, hi, pairs):
        n = min(hi, b + pairs) - b
        for f in range(n):
            for k in range(K2):
                buf[2 * f, k] = w_gate[b + f, k]
                buf[2 * f + 1, k] = w_up[b + f, k]
        for p in range(P):
            for r in range(0, 2 * n, NR):
                _mk12x32_bf16(xt, p, buf, r, acc)
                # two neighbouring f (b and r / 2 even, and n too: F is) make one uint32 of pairs per token, stored
                # along m: a loop LLVM vectorises. One bf16 a store, 2 bytes apart, took 2 ms of a [256, 1024] MLP's
                # 18.5 (one thread)
                for t in range(0, min(NR // 2, n - r // 2), 2):
                    f = b + r // 2 + t
                    for m in range(PANEL):
                        h0 = np.uint32(_to_bf16(_silu(acc[2 * t, m]) * acc[2 * t + 1, m]))
                        h1 = np.uint32(_to_bf16(_silu(acc[2 * t + 2, m]) * acc[2 * t + 3, m]))
                        hp[p, f >> 1, m] = h0 | (h1 << np.uint32(16))


@njit(parallel=True, cache=True, nogil=True)
def matmul_many_bf16(xt, M, ws, outs, starts, chunks, R):  # matmul_many on pairs (u32 panels and weights)
    total = starts[-1]
    size = _chunk_rows(total, min(total, chunks), NR)
    for c in prange((total + size - 1) // size):
        _rows_into_bf16(xt, M, ws, outs, starts, c * size, min(total, (c + 1) * size), R)


@njit(parallel=True, cache=True, nogil=True)
def swiglu_panels_bf16(xt, M, w_gate, w_up, w_down, hp, out, starts, chunks, R, R_down):
    # swiglu_panels on pairs: gate/up into the pair panels hp [P, F/2, 32] u32 of h (bf16), then down from them
    F = w_gate.shape[0]
    size = _chunk_rows(F, min(F, chunks), NR // 2)
    # (a multiple of NR / 2, so even: each work item starts on an even f, and one thread writes each pair of h)
    for c in prange((F + size - 1) // size):
        _gate_up_into_bf16(xt, w_gate, w_up, hp, c * size, min(F, (c + 1) * size), R)
    total = w_down.shape[0]
    size2 = _chunk_rows(total, min(total, chunks), NR)
    for c in prange((total + size2 - 1) // size2):
        _rows_into_bf16(hp, M, (w_down,), (out,), starts, c * size2, min(total, (c + 1) * size2), R_down)


@njit(cache=True, nogil=True)
def _pack_bf16(x, xt):  # [M, K] f32 -> xt [P, K/2, 32] u32: x rounded to bf16, in pairs
    # (the rows past M: zeros)
    M, K = x.shape
    for m in range(xt.shape[0] * PANEL):
        p, t = m // PANEL, m % PANEL
        if m < M:
            for kk in range(K // 2):
                lo = np.uint32(_to_bf16(x[m, 2 * kk]))
                hi = np.uint32(_to_bf16(x[m, 2 * kk + 1]))
                xt[p, kk, t] = lo | (hi << np.uint32(16))
        else:
            for kk in range(K // 2):
                xt[p, kk, t] = np.uint32(0)


def panels_bf16(x2: np.ndarray) -> np.ndarray:  # [M, K] f32 -> [ceil(M / 32), K / 2, 32] u32 bf16 pairs
    M, K = x2.shape
    xt = np.empty((-(-M // PANEL), K // 2, PANEL), np.uint32)
    _pack_bf16(x2, xt)
    return xt


def _pairs(bits: np.ndarray) -> np.ndarray:  # [N, K] u16 -> [N, K/2] u32, the same memory
    return bits.view(np.uint32)


def matmul_bf16(x2: np.ndarray, bits: tuple) -> tuple:  # [M, K] f32, n x [N_i, K] u16 -> n x [M, N_i] f32
    # "medium": x rounded to bf16 (nearest, ties to even), products and float32 sums by vdpbf16ps
    M, K = x2.shape
    outs = tuple(np.empty((M, b.shape[0]), np.float32) for b in bits)
    starts = _starts(tuple(b.shape[0] for b in bits))
    matmul_many_bf16(
        panels_bf16(x2), M, tuple(_pairs(b) for b in bits), outs, starts, _chunks(), block_rows_bf16(K)
    )
    return outs


def swiglu_bf16(x2: np.ndarray, w_gate: np.ndarray, w_up: np.ndarray, w_down: np.ndarray) -> np.ndarray:
    # [M, d] f32, [F, d] u16 x2, [d, F] u16 -> [M, d] f32: "medium"'s MLP in one launch (x and h rounded to bf16)
    xt = panels_bf16(x2)
    F = w_gate.shape[0]
    hp = np.empty((xt.shape[0], F // 2, PANEL), np.uint32)
    out = np.empty(x2.shape, np.float32)
    swiglu_panels_bf16(xt, x2.shape[0], _pairs(w_gate), _pairs(w_up), _pairs(w_down), hp, out,
                       _starts((w_down.shape[0],)), _chunks(),
                       block_rows_bf16(x2.shape[1]), block_rows_bf16(F))  # fmt: skip
    return out


def block_rows_bf16(K: int) -> int:  # rows of a block of bf16 pairs: a multiple of NR within BUF_BYTES
    return max(NR, BUF_BYTES // (2 * K) // NR * NR)


@cache
def available_bf16() -> bool:  # Numba compiles for AVX-512 with AVX512-BF16 (vdpbf16ps)
    return available() and numba_target_has("avx512bf16")


def usable_bf16(bits: tuple, *ks: int) -> bool:  # usable(), for the pair kernels: K / 2 a multiple of UNROLL
    sizes = (bits[0].shape[1], *ks)
    return (
        available_bf16()
        and all(k % 2 == 0 for k in sizes)
        and fits(*(k // 2 for k in sizes))
        and usable(bits)
    )
