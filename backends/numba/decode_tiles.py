"""A batched decode step's products (continuous batching: 2 to linear.GEMV_MAX_ROWS token rows, each one new
token of its own sequence) in register tiles: 4 token rows x 3 weight rows (AVX2's 16 registers), or x 6 where
the CPU has AVX-512's 32 (WIDE_TILES). Each weight vector is widened from bf16 once per tile and used for four
token rows; the weights stream from memory once for the whole step. linear.py picks these kernels for 2+ rows;
one row keeps gemv_one_row.py's loops (bit-identical to a lone decode).

matmul_precision="medium" where Numba's target has AVX-512 and AVX512-BF16 (DPBF16_TILES; linear.BATCH_DPBF16):
the same 4 x 6 tiles on bf16 pairs (`_tile4x6_dpbf16`, in IR): x rounded to bf16 (nearest, ties to even) and read
as uint32 pairs, the weights' uint32 pairs straight into `vdpbf16ps` (no widening), 16 lanes x 2 k per
instruction; SwiGLU in one call with h = SiLU(g)·u rounded to bf16 (as "medium" rounds every input of a bf16
product), whose rows are the pairs the down projection reads.
Numerics: a bf16 x bf16 product is exact in float32, so the inputs are those of llama.cpp's bf16 path and of the
float32 tiles on rounded x; only the float32 sums differ in order. Each lane sums the pairs k = 2(16j + lane) and
+1 (vdpbf16ps: the pair's high product added, then the low one, each addition rounded to nearest even in float32),
then the 16 lanes are added as a tree: K float32 additions of exact products in all, so |error| <= K·2⁻²⁴ ·
Σ|x_k·w_k| (tests/test_batch_gemm.py holds every output to it against float64 sums). vdpbf16ps ignores MXCSR:
denormal inputs are read as zero and denormal results flushed to zero, which touches only magnitudes below
2⁻¹²⁶ ≈ 1.2e-38 (bf16 has float32's exponent range): such an x or weight counts as 0, such a partial sum becomes 0.
A row's sums depend neither on the other rows nor on its place in a tile.
Speed (AMD EPYC Zen 5, shared, load ~3.3; one thread, 16 rows, one process, interleaved, best of 30): Qwen3-0.6B's
q/k/v [4096, 1024] 190 -> 318 GFLOP/s against the float32 tiles on rounded x, o_proj [1024, 2048] 202 -> 352,
gate/up 178 -> 289, down [1024, 3072] 204 -> 336 (1.62-1.74x). A whole 16-row step of the 0.6B model at 128
positions (benchmarks/bench_batch_decode.py --model --medium, best of 6): one thread 171 against 223 ms "highest"
(1.31x; 243 ms medium on the float32 tiles); two threads by CPU time 203 against 249 ms (1.23x), by wall time
1.25x and 1.30x in two runs (286 against 371 ms) and 0.98x in a third (150 against 147 ms): the other work on
the two cores moves the wall times 2.5x from run to run.
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.extending import intrinsic

from tinyqwen.backends.numba.intrinsics import (
    F32X16,
    I32X16,
    _bf16,
    _prefetch_weight_row,
    _silu,
    _to_bf16,
    _weight_of,
    dpbf16ps,
    numba_target_has,
)
from tinyqwen.backends.numba.settings import _host_features

# The one-row loops above, run for M rows, widen every bf16 weight M times and keep one accumulator per loop:
# from 4 rows on the step is compute-bound and those loops were ~10x slower for 16 rows than for one. These take
# a tile of 4 token rows x 3 weight rows: each pass over k loads three weight vectors (widened once, used for
# four rows) and four x vectors, and feeds twelve independent accumulators. Twelve, not eight: an FMA takes 4
# cycles and two start per cycle, so eight chains only just keep the two FMA units busy and any stall idles
# them; and each x vector loaded feeds three products instead of two (the x rows of a 16-row step are 64-192 KiB,
# past L1: their loads come from L2). LLVM keeps the 12 accumulators, 3 weights and one x vector in AVX2's 16
# registers (no spill; a 3 x 4 tile needs 17 and spilled, running at 60 %). Measured on one core of this AVX2
# EPYC, 16 token rows, Qwen3-0.6B's gate (3072 x 1024) and down (1024 x 3072) shapes, same process: 4 x 3 tiles
# 25 and 32 GMAC/s, the 4 x 2 tiles before them 19 and 26, 6 x 2 tiles 21 and 31; a whole 16-row step's products
# (28 layers + lm_head, one thread, CPU time, a busy machine) 378-388 ms against 415-444 with 4 x 2 tiles; on
# two threads at load < 1, 181-201 ms against 198-209 (1.04-1.10x; 64 rows 1.24x).
# (Reading the weights as uint32 pairs, one AND or shift widening two bf16 values, was no faster.) "contract"
# lets LLVM fuse each multiply and add into one FMA (one rounding instead of two), so a batched row differs from
# the same row alone by the float32 rounding of its dot products, within the tolerance tests/test_batching.py
# checks; a row's sums depend neither on the other rows of its step nor on its place in a tile. Rows past the last
# multiple of 4 (weight rows past the last multiple of 3) repeat the last one in the tile's spare places, computed
# and written twice with the same value. One row (plain decode) never comes here: it keeps the kernels above,
# bit-identical.
TILE_FAST = {"reassoc", "contract"}


@njit(cache=True, fastmath=TILE_FAST, error_model="numpy", inline="always")
def _tile_4x3(x, m0, m1, m2, m3, w0, w1, w2):  # x[m0..m3] . w0, w1, w2 -> 12 sums, row by row
    K = x.shape[1]
    a00 = a01 = a02 = a10 = a11 = a12 = a20 = a21 = a22 = a30 = a31 = a32 = np.float32(0.0)
    for k in range(K):
        v0 = _bf16(w0[k])
        v1 = _bf16(w1[k])
        v2 = _bf16(w2[k])
        x0 = x[m0, k]
        a00 += x0 * v0
        a01 += x0 * v1
        a02 += x0 * v2
        x1 = x[m1, k]
        a10 += x1 * v0
        a11 += x1 * v1
        a12 += x1 * v2
        x2 = x[m2, k]
        a20 += x2 * v0
        a21 += x2 * v1
        a22 += x2 * v2
        x3 = x[m3, k]
        a30 += x3 * v0
        a31 += x3 * v1
        a32 += x3 * v2
    return a00, a01, a02, a10, a11, a12, a20, a21, a22, a30, a31, a32


@njit(cache=True, fastmath=TILE_FAST, error_model="numpy")
def _gemm_rows_bf16(x, ws, outs, starts, lo, hi):  # rows lo..hi of the stacked row space, M >= 2 token rows
    # three stacked rows at a time (each from whichever weight holds it: a triple may span two weights)
    M = x.shape[0]
    i = 0
    for r in range(lo, hi, 3):
        i0 = i = _weight_of(starts, i, r)
        i1 = _weight_of(starts, i0, min(r + 1, hi - 1))
        i2 = _weight_of(starts, i1, min(r + 2, hi - 1))
        n0, n1, n2 = r - starts[i0], min(r + 1, hi - 1) - starts[i1], min(r + 2, hi - 1) - starts[i2]
        for ahead in range(r + 3, min(r + 6, hi)):  # the next triple's rows, while this one is summed
            j = _weight_of(starts, i2, ahead)
            _prefetch_weight_row(ws[j][ahead - starts[j]])
        w0, w1, w2 = ws[i0][n0], ws[i1][n1], ws[i2][n2]
        o0, o1, o2 = outs[i0], outs[i1], outs[i2]
        for m in range(0, M, 4):
            m1, m2, m3 = min(m + 1, M - 1), min(m + 2, M - 1), min(m + 3, M - 1)
            t = _tile_4x3(x, m, m1, m2, m3, w0, w1, w2)
            o0[m, n0], o1[m, n1], o2[m, n2] = t[0], t[1], t[2]
            o0[m1, n0], o1[m1, n1], o2[m1, n2] = t[3], t[4], t[5]
            o0[m2, n0], o1[m2, n1], o2[m2, n2] = t[6], t[7], t[8]
            o0[m3, n0], o1[m3, n1], o2[m3, n2] = t[9], t[10], t[11]


@njit(cache=True, fastmath=TILE_FAST, error_model="numpy")
def _gate_up_gemm_rows_bf16(x, w_gate, w_up, out, lo, hi):  # rows lo..hi of the gate/up pair, M >= 2 rows
    # three gate/up pairs (six weight rows) as two tiles, (g0, u0, g1) and (u1, g2, u2): the SiLU products
    # straight from the registers
    M = x.shape[0]
    for f in range(lo, hi, 3):
        f1, f2 = min(f + 1, hi - 1), min(f + 2, hi - 1)
        for ahead in range(f + 3, min(f + 6, hi)):
            _prefetch_weight_row(w_gate[ahead])
            _prefetch_weight_row(w_up[ahead])
        for m in range(0, M, 4):
            m1, m2, m3 = min(m + 1, M - 1), min(m + 2, M - 1), min(m + 3, M - 1)
            a = _tile_4x3(x, m, m1, m2, m3, w_gate[f], w_up[f], w_gate[f1])
            b = _tile_4x3(x, m, m1, m2, m3, w_up[f1], w_gate[f2], w_up[f2])
            out[m, f], out[m, f1], out[m, f2] = _silu(a[0]) * a[1], _silu(a[2]) * b[0], _silu(b[1]) * b[2]
            out[m1, f], out[m1, f1], out[m1, f2] = _silu(a[3]) * a[4], _silu(a[5]) * b[3], _silu(b[4]) * b[5]
            out[m2, f], out[m2, f1], out[m2, f2] = _silu(a[6]) * a[7], _silu(a[8]) * b[6], _silu(b[7]) * b[8]
            out[m3, f], out[m3, f1], out[m3, f2] = (
                _silu(a[9]) * a[10],
                _silu(a[11]) * b[9],
                _silu(b[10]) * b[11],
            )


# AVX-512 hosts: tiles of 4 token rows x 6 weight rows. With 32 vector registers the 24 accumulators, six widened
# weight vectors and one x vector fit (31; on AVX2's 16 the tile would spill, so there the 4 x 3 tiles stay), and
# each x vector loaded and each weight vector widened feed six and four products instead of three and four. Measured
# on one core of the 2-core AMD EPYC (Zen 5, AVX-512; a busy machine, load 6-9, same process, interleaved, best of
# 20, 16 token rows): Qwen3-0.6B's gate (3072 x 1024) 151-160 GFLOP/s with 4 x 3 tiles against 195 with 4 x 6, down
# (1024 x 3072) 120-128 against 197-203 (8 x 3: 183 and 178; 4 x 4: 187 and 165; 2 x 8: 181 and 169; OpenBLAS's
# sgemm on the same float32 weights: 66-69). Whole 16-row decode steps of Qwen3-0.6B (128 positions per row, the
# weights streamed from memory; benchmarks/bench_batch_decode.py --model, same process, interleaved, best of 4-5,
# load 5-7): 1.14x on one thread and 1.13x on two by CPU time, 1.04-1.10x by wall time on two; the step's products
# alone (one thread, CPU time) 1.14-1.19x. Every sum is the 4 x 3 tiles' bit for bit (each accumulator adds the
# same products in the same order), so the logits do not move. A constant per host, as Numba keys its saved kernels
# by CPU features.
WIDE_TILES = "+avx512f" in _host_features()


@njit(cache=True, fastmath=TILE_FAST, error_model="numpy", inline="always")
def _tile_4x6(x, m0, m1, m2, m3, w0, w1, w2, w3, w4, w5):  # x[m0..m3] . w0..w5 -> 24 sums, row by row
    K = x.shape[1]
    a00 = a01 = a02 = a03 = a04 = a05 = a10 = a11 = a12 = a13 = a14 = a15 = np.float32(0.0)
    a20 = a21 = a22 = a23 = a24 = a25 = a30 = a31 = a32 = a33 = a34 = a35 = np.float32(0.0)
    for k in range(K):
        v0 = _bf16(w0[k])
        v1 = _bf16(w1[k])
        v2 = _bf16(w2[k])
        v3 = _bf16(w3[k])
        v4 = _bf16(w4[k])
        v5 = _bf16(w5[k])
        x0 = x[m0, k]
        a00 += x0 * v0
        a01 += x0 * v1
        a02 += x0 * v2
        a03 += x0 * v3
        a04 += x0 * v4
        a05 += x0 * v5
        x1 = x[m1, k]
        a10 += x1 * v0
        a11 += x1 * v1
        a12 += x1 * v2
        a13 += x1 * v3
        a14 += x1 * v4
        a15 += x1 * v5
        x2 = x[m2, k]
        a20 += x2 * v0
        a21 += x2 * v1
        a22 += x2 * v2
        a23 += x2 * v3
        a24 += x2 * v4
        a25 += x2 * v5
        x3 = x[m3, k]
        a30 += x3 * v0
        a31 += x3 * v1
        a32 += x3 * v2
        a33 += x3 * v3
        a34 += x3 * v4
        a35 += x3 * v5
    return (
        (a00, a01, a02, a03, a04, a05),
        (a10, a11, a12, a13, a14, a15),
        (a20, a21, a22, a23, a24, a25),
        (a30, a31, a32, a33, a34, a35),
    )


@njit(cache=True, inline="always")
def _store6(o0, o1, o2, o3, o4, o5, m, n0, n1, n2, n3, n4, n5, t):  # one token row's six sums
    o0[m, n0], o1[m, n1], o2[m, n2] = t[0], t[1], t[2]
    o3[m, n3], o4[m, n4], o5[m, n5] = t[3], t[4], t[5]


@njit(cache=True, fastmath=TILE_FAST, error_model="numpy")
def _gemm6_rows_bf16(x, ws, outs, starts, lo, hi):  # _gemm_rows_bf16 in 4 x 6 tiles (WIDE_TILES)
    # six stacked rows at a time, each from whichever weight holds it; rows past hi repeat row hi - 1
    M = x.shape[0]
    i = 0
    for r in range(lo, hi, 6):
        r1, r2, r3, r4, r5 = (
            min(r + 1, hi - 1),
            min(r + 2, hi - 1),
            min(r + 3, hi - 1),
            min(r + 4, hi - 1),
            min(r + 5, hi - 1),
        )
        i0 = i = _weight_of(starts, i, r)
        i1 = _weight_of(starts, i0, r1)
        i2 = _weight_of(starts, i1, r2)
        i3 = _weight_of(starts, i2, r3)
        i4 = _weight_of(starts, i3, r4)
        i5 = _weight_of(starts, i4, r5)
        n0, n1, n2 = r - starts[i0], r1 - starts[i1], r2 - starts[i2]
        n3, n4, n5 = r3 - starts[i3], r4 - starts[i4], r5 - starts[i5]
        for ahead in range(r + 6, min(r + 12, hi)):  # the next six rows, while these are summed
            j = _weight_of(starts, i5, ahead)
            _prefetch_weight_row(ws[j][ahead - starts[j]])
        w0, w1, w2, w3, w4, w5 = ws[i0][n0], ws[i1][n1], ws[i2][n2], ws[i3][n3], ws[i4][n4], ws[i5][n5]
        o0, o1, o2, o3, o4, o5 = outs[i0], outs[i1], outs[i2], outs[i3], outs[i4], outs[i5]
        for m in range(0, M, 4):
            m1, m2, m3 = min(m + 1, M - 1), min(m + 2, M - 1), min(m + 3, M - 1)
            t = _tile_4x6(x, m, m1, m2, m3, w0, w1, w2, w3, w4, w5)
            _store6(o0, o1, o2, o3, o4, o5, m, n0, n1, n2, n3, n4, n5, t[0])
            _store6(o0, o1, o2, o3, o4, o5, m1, n0, n1, n2, n3, n4, n5, t[1])
            _store6(o0, o1, o2, o3, o4, o5, m2, n0, n1, n2, n3, n4, n5, t[2])
            _store6(o0, o1, o2, o3, o4, o5, m3, n0, n1, n2, n3, n4, n5, t[3])


@njit(cache=True, fastmath=TILE_FAST, error_model="numpy", inline="always")
def _store_swiglu3(out, m, f, f1, f2, t):  # one token row's three gate/up pairs -> silu(gate) * up
    out[m, f], out[m, f1], out[m, f2] = _silu(t[0]) * t[1], _silu(t[2]) * t[3], _silu(t[4]) * t[5]


@njit(cache=True, fastmath=TILE_FAST, error_model="numpy")
def _gate_up6_rows_bf16(x, w_gate, w_up, out, lo, hi):  # _gate_up_gemm_rows_bf16 in 4 x 6 tiles (WIDE_TILES)
    # three gate/up pairs (six weight rows) as one tile: the SiLU products straight from the registers
    M = x.shape[0]
    for f in range(lo, hi, 3):
        f1, f2 = min(f + 1, hi - 1), min(f + 2, hi - 1)
        for ahead in range(f + 3, min(f + 6, hi)):
            _prefetch_weight_row(w_gate[ahead])
            _prefetch_weight_row(w_up[ahead])
        for m in range(0, M, 4):
            m1, m2, m3 = min(m + 1, M - 1), min(m + 2, M - 1), min(m + 3, M - 1)
            t = _tile_4x6(x, m, m1, m2, m3, w_gate[f], w_up[f], w_gate[f1], w_up[f1], w_gate[f2], w_up[f2])
            _store_swiglu3(out, m, f, f1, f2, t[0])
            _store_swiglu3(out, m1, f, f1, f2, t[1])
            _store_swiglu3(out, m2, f, f1, f2, t[2])
            _store_swiglu3(out, m3, f, f1, f2, t[3])


@njit(cache=True, inline="always")
def _chunk_size(total, chunks, multiple):  # rows per work item: total over chunks, rounded up to a multiple
    size = (total + chunks - 1) // chunks
    return size + (multiple - size % multiple) % multiple


@njit(parallel=True, cache=True, nogil=True)
def _gemm_many_bf16(x, ws, outs, starts, chunks):  # _gemv_many_bf16 for M >= 2 rows (chunks of 3k rows)
    total = starts[-1]
    size = _chunk_size(total, min(total, chunks), 3)
    for c in prange((total + size - 1) // size):
        _gemm_rows_bf16(x, ws, outs, starts, c * size, min(total, (c + 1) * size))


@njit(parallel=True, cache=True, nogil=True)
def _gemm6_many_bf16(x, ws, outs, starts, chunks):  # _gemm_many_bf16 in 4 x 6 tiles (chunks of 6k rows)
    total = starts[-1]
    size = _chunk_size(total, min(total, chunks), 6)
    for c in prange((total + size - 1) // size):
        _gemm6_rows_bf16(x, ws, outs, starts, c * size, min(total, (c + 1) * size))


@njit(parallel=True, cache=True, nogil=True)
def _gate_up_gemm_bf16(x, w_gate, w_up, out, chunks):  # _gate_up_bf16 for M >= 2 rows
    F = w_gate.shape[0]
    size = _chunk_size(F, min(F, chunks), 3)
    for c in prange((F + size - 1) // size):
        _gate_up_gemm_rows_bf16(x, w_gate, w_up, out, c * size, min(F, (c + 1) * size))


@njit(parallel=True, cache=True, nogil=True)
def _swiglu_gemm_bf16(x, w_gate, w_up, w_down, h, out, starts, chunks):  # _swiglu_bf16 for M >= 2 rows
    F = w_gate.shape[0]
    size = _chunk_size(F, min(F, chunks), 3)
    for c in prange((F + size - 1) // size):
        _gate_up_gemm_rows_bf16(x, w_gate, w_up, h, c * size, min(F, (c + 1) * size))
    total = w_down.shape[0]
    size2 = _chunk_size(total, min(total, chunks), 3)
    for c in prange((total + size2 - 1) // size2):
        _gemm_rows_bf16(h, (w_down,), (out,), starts, c * size2, min(total, (c + 1) * size2))


@njit(parallel=True, cache=True, nogil=True)
def _gate_up6_gemm_bf16(x, w_gate, w_up, out, chunks):  # _gate_up_gemm_bf16 in 4 x 6 tiles
    F = w_gate.shape[0]
    size = _chunk_size(F, min(F, chunks), 3)
    for c in prange((F + size - 1) // size):
        _gate_up6_rows_bf16(x, w_gate, w_up, out, c * size, min(F, (c + 1) * size))


@njit(parallel=True, cache=True, nogil=True)
def _swiglu6_gemm_bf16(x, w_gate, w_up, w_down, h, out, starts, chunks):  # _swiglu_gemm_bf16 in 4 x 6 tiles
    F = w_gate.shape[0]
    size = _chunk_size(F, min(F, chunks), 3)
    for c in prange((F + size - 1) // size):
        _gate_up6_rows_bf16(x, w_gate, w_up, h, c * size, min(F, (c + 1) * size))
    total = w_down.shape[0]
    size2 = _chunk_size(total, min(total, chunks), 6)
    for c in prange((total + size2 - 1) // size2):
        _gemm6_rows_bf16(h, (w_down,), (out,), starts, c * size2, min(total, (c + 1) * size2))


# --- matmul_precision="medium" on AVX512-BF16: the 4 x 6 tiles on bf16 pairs and vdpbf16ps ----------------------
#
# "medium" rounds x (and SwiGLU's h) to bf16. With AVX512-BF16 the weights go into the products as they are stored:
# each uint32 of a row holds two bf16 weights, each of x's its two rounded inputs, and one vdpbf16ps takes 16 such
# pairs (32 k) of one token row and one weight row: no shift/and widening, 2 k per lane per instruction. The tile
# keeps the 4 x 6 shape (24 accumulators of 16 lanes, 6 weight vectors, one x vector: 31 of 32 registers); each
# accumulator holds 16 partial sums over k, added at the end. LLVM's vectoriser would not form vdpbf16ps from
# scalar code, so the tile is written in IR.
DPBF16_TILES = WIDE_TILES and numba_target_has("avx512bf16")
PAIR_LANES = 16  # pairs of k per vector: K / 2 must be a multiple


def _sums_of(builder, vs: list) -> ir.Value:
    """2^s <16 x float> vectors (s <= 4) -> one <16 x float> whose lanes hold their lane sums: vector i's in lanes
    i·16/2^s .. (i+1)·16/2^s (all 16 lanes for one vector, one lane each for sixteen).

    A transposing tree: each stage pairs neighbouring vectors and adds the two halves of each one's live lanes,
    so sixteen sums cost 15 adds and 30 shuffles, where one tree per vector (halves, quarters, ...) cost 64 and
    128, and 16 extracts and stores.
    """
    i32 = ir.IntType(32)
    group = 16  # live lanes per vector's sum
    while len(vs) > 1:
        half = group // 2
        lo = [lane for g in range(0, 16, group) for lane in range(g, g + half)]  # each group's first half
        hi = [lane + half for lane in lo]
        mask_lo = ir.Constant(ir.VectorType(i32, 16), lo + [16 + lane for lane in lo])
        mask_hi = ir.Constant(ir.VectorType(i32, 16), hi + [16 + lane for lane in hi])
        vs = [
            builder.fadd(builder.shuffle_vector(a, b, mask_lo), builder.shuffle_vector(a, b, mask_hi))
            for a, b in zip(vs[0::2], vs[1::2], strict=True)
        ]
        group = half
    return vs[0]


def _store_sums(
    builder, vs: list, address
) -> None:  # 8 <16 x float> vectors' lane sums -> 8 floats at address
    v = _sums_of(builder, vs)  # vector i's sum in lanes 2i, 2i + 1: one more stage, the vector with itself
    i32 = ir.IntType(32)
    even = builder.shuffle_vector(v, v, ir.Constant(ir.VectorType(i32, 8), list(range(0, 16, 2))))
    odd = builder.shuffle_vector(v, v, ir.Constant(ir.VectorType(i32, 8), list(range(1, 16, 2))))
    builder.store(builder.fadd(even, odd), builder.bitcast(address, ir.VectorType(ir.FloatType(), 8).as_pointer()),
                  align=4)  # fmt: skip


@intrinsic
def _tile4x6_dpbf16(typingctx, x, m0, m1, m2, m3, w0, w1, w2, w3, w4, w5, acc):
    """acc[i, j] = Σ_k x[m_i, k] · w_j[k] over bf16 pairs: x [M, K2] u32, w_j [K2] u32 -> acc [4, 6] f32.

    One loop over the pairs, 16 at a time: six weight vectors loaded, then per token row its x vector and six
    vdpbf16ps into the 24 accumulators (phi nodes); each accumulator's 16 lanes summed at the end. All arrays
    C-contiguous, K2 a multiple of 16 and > 0.
    """

    def codegen(context, builder, signature, args):
        i64 = ir.IntType(64)

        def const(v):
            return ir.Constant(i64, v)

        xa = context.make_array(signature.args[0])(context, builder, args[0])
        wa = [context.make_array(signature.args[5 + j])(context, builder, args[5 + j]) for j in range(6)]
        aa = context.make_array(signature.args[11])(context, builder, args[11])
        K2 = builder.extract_value(xa.shape, 1)
        x_rows = [builder.gep(xa.data, [builder.mul(args[1 + i], K2)]) for i in range(4)]
        zero = ir.Constant(F32X16, [0.0] * 16)
        before = builder.block
        loop = builder.append_basic_block("tile4x6bf16.loop")
        done = builder.append_basic_block("tile4x6bf16.done")
        builder.branch(loop)
        builder.position_at_end(loop)
        k = builder.phi(i64)
        sums = [builder.phi(F32X16) for _ in range(24)]
        k.add_incoming(const(0), before)
        for s in sums:
            s.add_incoming(zero, before)

        def load(base):
            return builder.load(builder.bitcast(builder.gep(base, [k]), I32X16.as_pointer()), align=4)

        w = [load(a.data) for a in wa]
        cur = list(sums)
        for i in range(4):
            xv = load(x_rows[i])
            for j in range(6):
                cur[6 * i + j] = dpbf16ps(builder, cur[6 * i + j], xv, w[j])
        k_next = builder.add(k, const(PAIR_LANES))
        end = builder.block
        k.add_incoming(k_next, end)
        for s, n in zip(sums, cur, strict=True):
            s.add_incoming(n, end)
        builder.cbranch(builder.icmp_signed("<", k_next, K2), loop, done)
        builder.position_at_end(done)
        # acc[i, j] is accumulator 6i + j: the first sixteen summed into one vector, the last eight into half one
        builder.store(_sums_of(builder, cur[:16]), builder.bitcast(aa.data, F32X16.as_pointer()), align=4)
        _store_sums(builder, cur[16:], builder.gep(aa.data, [const(16)]))
        return context.get_dummy_value()

    sig = types.void(x, m0, m1, m2, m3, w0, w1, w2, w3, w4, w5, acc)
    return sig, codegen


@njit(cache=True, error_model="numpy", inline="always")
def _store6_acc(o0, o1, o2, o3, o4, o5, m, n0, n1, n2, n3, n4, n5, acc, i):  # acc row i -> token row m
    o0[m, n0], o1[m, n1], o2[m, n2] = acc[i, 0], acc[i, 1], acc[i, 2]
    o3[m, n3], o4[m, n4], o5[m, n5] = acc[i, 3], acc[i, 4], acc[i, 5]


@njit(cache=True, error_model="numpy")
def _gemm6_rows_dpbf16(
    x, ws, outs, starts, lo, hi
):  # _gemm6_rows_bf16 on pairs: x [M, K2] u32, ws [N_i, K2] u32
    M = x.shape[0]
    acc = np.empty((4, 6), np.float32)
    i = 0
    for r in range(lo, hi, 6):
        r1, r2, r3 = min(r + 1, hi - 1), min(r + 2, hi - 1), min(r + 3, hi - 1)
        r4, r5 = min(r + 4, hi - 1), min(r + 5, hi - 1)
        i0 = i = _weight_of(starts, i, r)
        i1 = _weight_of(starts, i0, r1)
        i2 = _weight_of(starts, i1, r2)
        i3 = _weight_of(starts, i2, r3)
        i4 = _weight_of(starts, i3, r4)
        i5 = _weight_of(starts, i4, r5)
        n0, n1, n2 = r - starts[i0], r1 - starts[i1], r2 - starts[i2]
        n3, n4, n5 = r3 - starts[i3], r4 - starts[i4], r5 - starts[i5]
        for ahead in range(r + 6, min(r + 12, hi)):  # the next six rows, while these are summed
            j = _weight_of(starts, i5, ahead)
            _prefetch_weight_row(ws[j][ahead - starts[j]])
        w0, w1, w2, w3, w4, w5 = ws[i0][n0], ws[i1][n1], ws[i2][n2], ws[i3][n3], ws[i4][n4], ws[i5][n5]
        o0, o1, o2, o3, o4, o5 = outs[i0], outs[i1], outs[i2], outs[i3], outs[i4], outs[i5]
        for m in range(0, M, 4):
            m1, m2, m3 = min(m + 1, M - 1), min(m + 2, M - 1), min(m + 3, M - 1)
            _tile4x6_dpbf16(x, m, m1, m2, m3, w0, w1, w2, w3, w4, w5, acc)
            _store6_acc(o0, o1, o2, o3, o4, o5, m, n0, n1, n2, n3, n4, n5, acc, 0)
            _store6_acc(o0, o1, o2, o3, o4, o5, m1, n0, n1, n2, n3, n4, n5, acc, 1)
            _store6_acc(o0, o1, o2, o3, o4, o5, m2, n0, n1, n2, n3, n4, n5, acc, 2)
            _store6_acc(o0, o1, o2, o3, o4, o5, m3, n0, n1, n2, n3, n4, n5, acc, 3)


@njit(cache=True, fastmath=TILE_FAST, error_model="numpy")
def _gate_up6_rows_dpbf16(x, w_gate, w_up, h, lo, hi):  # _gate_up6_rows_bf16 on pairs -> h [M, F] u16 (bf16)
    # SiLU(g)·u rounded to bf16 (nearest, ties to even), as "medium" rounds every input of a bf16 product: h's rows
    # are then the pairs the down projection reads
    # The sums go to g and u first, and SiLU·mul and the rounding run after the tiles as one loop along f per row,
    # which LLVM vectorises: per value inside the tile loop (scalar exp, division, rounding) they took a quarter of
    # the gate/up time (16 rows, [3072, 1024] x2, one thread: 0.87 ms against 0.64 for the products alone)
    M = x.shape[0]
    acc = np.empty((4, 6), np.float32)
    g = np.empty((M, hi - lo), np.float32)
    u = np.empty((M, hi - lo), np.float32)
    for f in range(lo, hi, 3):
        f1, f2 = min(f + 1, hi - 1), min(f + 2, hi - 1)
        for ahead in range(f + 3, min(f + 6, hi)):
            _prefetch_weight_row(w_gate[ahead])
            _prefetch_weight_row(w_up[ahead])
        for m in range(0, M, 4):
            _tile4x6_dpbf16(x, m, min(m + 1, M - 1), min(m + 2, M - 1), min(m + 3, M - 1),
                            w_gate[f], w_up[f], w_gate[f1], w_up[f1], w_gate[f2], w_up[f2], acc)  # fmt: skip
            for i in range(min(4, M - m)):
                g[m + i, f - lo], u[m + i, f - lo] = acc[i, 0], acc[i, 1]
                g[m + i, f1 - lo], u[m + i, f1 - lo] = acc[i, 2], acc[i, 3]
                g[m + i, f2 - lo], u[m + i, f2 - lo] = acc[i, 4], acc[i, 5]
    for m in range(M):
        for f in range(hi - lo):
            h[m, lo + f] = _to_bf16(_silu(g[m, f]) * u[m, f])


@njit(parallel=True, cache=True, nogil=True)
def _gemm6_many_dpbf16(x, ws, outs, starts, chunks):  # _gemm6_many_bf16 on pairs (x and ws u32)
    total = starts[-1]
    size = _chunk_size(total, min(total, chunks), 6)
    for c in prange((total + size - 1) // size):
        _gemm6_rows_dpbf16(x, ws, outs, starts, c * size, min(total, (c + 1) * size))


@njit(parallel=True, cache=True, nogil=True)
def _swiglu6_gemm_dpbf16(x, w_gate, w_up, w_down, h, h32, out, starts, chunks):
    # _swiglu6_gemm_bf16 on pairs: gate/up into h [M, F] u16 (bf16), down from the same memory as h32 [M, F/2] u32
    F = w_gate.shape[0]
    size = _chunk_size(F, min(F, chunks), 6)  # (even: one thread writes both bf16 of each uint32 of h)
    for c in prange((F + size - 1) // size):
        _gate_up6_rows_dpbf16(x, w_gate, w_up, h, c * size, min(F, (c + 1) * size))
    total = w_down.shape[0]
    size2 = _chunk_size(total, min(total, chunks), 6)
    for c in prange((total + size2 - 1) // size2):
        _gemm6_rows_dpbf16(h32, (w_down,), (out,), starts, c * size2, min(total, (c + 1) * size2))


def dpbf16_fits(*ks: int) -> bool:  # inner sizes the vdpbf16ps tiles take: K / 2 a multiple of 16 pairs
    return DPBF16_TILES and all(k > 0 and k % (2 * PAIR_LANES) == 0 for k in ks)


def gemm_dpbf16(xbits: np.ndarray, bits: tuple, outs: tuple, starts: np.ndarray, chunks: int) -> None:
    # x's bf16 bits [M, K] u16, n x [N_i, K] u16 weights -> outs n x [M, N_i] f32 (written)
    _gemm6_many_dpbf16(xbits.view(np.uint32), tuple(b.view(np.uint32) for b in bits), outs, starts, chunks)


def swiglu_dpbf16(xbits: np.ndarray, w_gate, w_up, w_down, starts: np.ndarray, chunks: int) -> np.ndarray:
    # x's bf16 bits [M, d] u16, [F, d] u16 x2, [d, F] u16 -> [M, d] f32: gate/up, SiLU·mul, down in one call
    M, F = xbits.shape[0], w_gate.shape[0]
    h = np.empty((M, F), np.uint16)
    out = np.empty((M, w_down.shape[0]), np.float32)
    _swiglu6_gemm_dpbf16(xbits.view(np.uint32), w_gate.view(np.uint32), w_up.view(np.uint32),
                         w_down.view(np.uint32), h, h.view(np.uint32), out, starts, chunks)  # fmt: skip
    return out
