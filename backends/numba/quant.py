"""Products with GGUF's quantized weights (Q8_0, Q4_K, Q6_K) that stay in their blocks: decode's GEMVs read the
int8 / 4-bit / 6-bit codes straight from the file's bytes, prefill widens a block of rows and calls BLAS.

One concept: the three block formats' inner loops side by side (they share the GEMV's skeleton, the activation
quantizers and the dispatch), so a reader compares them in one place.

The layouts are llama.cpp's (`ggml-common.h`), one row of a weight = its blocks in order:

    q8_0   32 values,  34 bytes: fp16 d, 32 int8 q                          w = d·q
    q4_k  256 values, 144 bytes: fp16 d, fp16 dmin, 12 bytes of eight 6-bit (scale, min) pairs, 128 bytes of
                                 nibbles (byte l of group g holds value 64g + l low, 64g + 32 + l high)
                                                                            w = d·sc_s·q − dmin·m_s  (s: 32 values)
    q6_k  256 values, 210 bytes: 128 bytes low nibbles, 64 bytes of 2-bit high parts, 16 int8 scales, fp16 d
                                                                            w = d·sc_s·(q − 32)      (s: 16 values)

Decode (one to QUANT_GEMV_MAX_ROWS tokens) has two ways to take a row's dot product with x, both here and both timed in
`benchmarks/bench_quant_gemv.py`:

- "int8" (the default; llama.cpp's): x is first quantized to int8 blocks itself — Q8_0 (32 values, scale
  amax/127) for q8_0 weights, Q8_K (256 values, scale max/−127, float32) for the k-quants — and the inner loops
  multiply integers, int8 × int8 (or × nibble) summed in int32, exact; the scales multiply once per block. The
  activation's rounding (≤ half a step, step = amax/127 of its block) is the only difference from float32. The
  dense GEMV keeps eight float32 lanes across a row's blocks (see "the dense GEMV's row dots" below); on CPUs with
  AVX2 the row runs in avx2.py's row intrinsics (`vpmaddubsw`/`vpmaddwd`, 32 products an instruction, the block
  loop in IR; Q8_0 with VNNI's `vpdpbusd` where the CPU has it), elsewhere in plain loops that give the same
  bits. x is quantized once per call, inside the parallel kernel, for all the weights of the call (q, k, v;
  gate and up). The row dots take the whole weight and a row number, never a row view (see avx2._Row). One
  thread, against the earlier kernels that returned one int32 per block (a horizontal add and a scalar
  multiply-add each): Qwen3-0.6B's shapes 1.5-2.2x faster (q8_0 down 1.9x, q4_k 2.1x, q6_k 1.8-2.1x,
  the 151936-row lm_head 1.5x; AMD EPYC, a busy machine; `benchmarks/profile_quant_step.py` times a whole step).
  The row intrinsics ask for the weight's lines 4 KB ahead (prefetch) and the GEMV picks the format once per
  weight, not per row: one thread over weights larger than the caches, Q4_K / Q6_K 1.24x, Q8_0 1.15x, and a
  further 1.6-2.6x per row from L2 (16-64 Q4_K rows a call, same process; `benchmarks/bench_quant_rows.py`
  prints each format against a plain read).
- "float": the codes are widened to float32 in registers and multiplied with x as it is (only float32 rounding).
  LLVM did not vectorise these loops well here: 1.2-4x slower than "int8" in the benchmark, so "int8" is the
  default and "float" stays as the comparison (and the exact-float32 option).

Prefill (more rows): "int8" takes quant_matmul.py's tiles (the row dots below, four tokens per decoded row, the
same bits); "float" widens a block of weight rows into a float32 scratch buffer (`dequantize_rows`), then BLAS's
sgemm — the same scheme as the bf16 path (`linear.py`): the float32 copy of a weight never exceeds the block.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from tinyqwen.backends.numba import avx2
from tinyqwen.backends.numba.intrinsics import FAST, _f16, _round_f16, _silu

# the kernels' numbering of the block formats
Q8_0, Q4_K, Q6_K = 0, 1, 2
KINDS = {"q8_0": Q8_0, "q4_k": Q4_K, "q6_k": Q6_K}


# ---- reading a block's fields --------------------------------------------------------------------------------


@njit(cache=True, inline="always")
def _half(b, o):  # the fp16 stored little-endian at bytes o, o+1 of a uint8 row -> float32
    return _f16(np.uint16(b[o]) | (np.uint16(b[o + 1]) << np.uint16(8)))


@njit(cache=True, inline="always")
def _scale_min_k4(b, o, j):  # Q4_K's j-th (scale, min) pair, 6 bits each, from the 12 bytes at o -> int32 x2
    # pairs 0-3: the low 6 bits of bytes j and j + 4; pairs 4-7: a nibble of byte j + 4 and the top 2 bits of
    # bytes j - 4 (scale) and j (min)
    if j < 4:
        return np.int32(b[o + j] & 63), np.int32(b[o + j + 4] & 63)
    sc = (b[o + j + 4] & 15) | ((b[o + j - 4] >> 6) << 4)
    mn = (b[o + j + 4] >> 4) | ((b[o + j] >> 6) << 4)
    return np.int32(sc), np.int32(mn)


# ---- dequantization of whole rows (prefill's blocks, the embedding lookup) -------------------------------------


@njit(cache=True, fastmath=FAST, error_model="numpy")
def _dequantize_row(kind, b, i8, out):  # one row: uint8 bytes, the same bytes as int8, -> out [K] f32
    K = out.shape[0]
    if kind == Q8_0:
        for blk in range(K // 32):
            o = blk * 34
            d = _half(b, o)
            for j in range(32):
                out[blk * 32 + j] = d * np.float32(i8[o + 2 + j])
    elif kind == Q4_K:
        for blk in range(K // 256):
            o = blk * 144
            d, dmin = _half(b, o), _half(b, o + 2)
            for g in range(4):
                sc1, m1 = _scale_min_k4(b, o + 4, 2 * g)
                sc2, m2 = _scale_min_k4(b, o + 4, 2 * g + 1)
                d1, d2 = d * np.float32(sc1), d * np.float32(sc2)
                n1, n2 = dmin * np.float32(m1), dmin * np.float32(m2)
                q, y = o + 16 + 32 * g, blk * 256 + 64 * g
                for l in range(32):
                    out[y + l] = d1 * np.float32(b[q + l] & 15) - n1
                    out[y + 32 + l] = d2 * np.float32(b[q + l] >> 4) - n2
    else:  # Q6_K
        for blk in range(K // 256):
            o = blk * 210
            d = _half(b, o + 208)
            for h in range(2):  # two halves of 128 values
                ql, qh, sc, y = o + 64 * h, o + 128 + 32 * h, o + 192 + 8 * h, blk * 256 + 128 * h
                for l in range(32):
                    s = l // 16
                    lo, hi, top = b[ql + l], b[ql + 32 + l], b[qh + l]
                    out[y + l] = d * np.float32(i8[sc + s]) * np.float32(((lo & 15) | ((top & 3) << 4)) - 32)
                    out[y + 32 + l] = (
                        d
                        * np.float32(i8[sc + s + 2])
                        * np.float32(((hi & 15) | (((top >> 2) & 3) << 4)) - 32)
                    )
                    out[y + 64 + l] = (
                        d
                        * np.float32(i8[sc + s + 4])
                        * np.float32(((lo >> 4) | (((top >> 4) & 3) << 4)) - 32)
                    )
                    out[y + 96 + l] = (
                        d
                        * np.float32(i8[sc + s + 6])
                        * np.float32(((hi >> 4) | (((top >> 6) & 3) << 4)) - 32)
                    )


@njit(cache=True, nogil=True)
def dequantize_rows(
    kind, b, i8, rows, out
):  # [N, bytes] u8 (and its int8 view), row ids [R] -> out [R, K] f32
    # one thread, as `_widen` in linear.py: it alternates with BLAS, whose threads are still spinning when it starts
    for r in range(rows.shape[0]):
        _dequantize_row(kind, b[rows[r]], i8[rows[r]], out[r])


@njit(parallel=True, cache=True, nogil=True)
def dequantize_rows_parallel(
    kind, b, i8, start, out
):  # rows start.. of [N, bytes] -> out [R, K] f32, threaded
    for r in prange(out.shape[0]):  # whole arrays and row numbers in the loop: no views shared by the threads
        _dequantize_row_at(kind, b, i8, start + r, out, r)


@njit(cache=True, fastmath=FAST, error_model="numpy")
def _dequantize_row_at(kind, b, i8, n, out, r):  # row n of b -> row r of out (one row view each, per row)
    _dequantize_row(kind, b[n], i8[n], out[r])


# ---- the activation's int8 blocks (llama.cpp's quantize_row_q8_0 / quantize_row_q8_K) --------------------------


@njit(cache=True, nogil=True, error_model="numpy")
def quantize_q8_0_rows(x, q, d):  # [M, K] f32 -> q [M, K] int8, d [M, K/32] f32 (written)
    # d = amax/127 rounded to fp16 as llama.cpp stores it; q = round-half-away(x·127/amax), from the unrounded d
    M, K = x.shape
    for m in range(M):
        for blk in range(K // 32):
            amax = np.float32(0.0)
            for j in range(32):
                amax = max(amax, abs(x[m, blk * 32 + j]))
            dd = amax / np.float32(127.0)
            inv = np.float32(1.0) / dd if dd != 0 else np.float32(0.0)
            for j in range(32):
                v = x[m, blk * 32 + j] * inv
                q[m, blk * 32 + j] = np.int8(np.int32(v + np.float32(0.5) if v >= 0 else v - np.float32(0.5)))
            d[m, blk] = _round_f16(dd)


@njit(cache=True, nogil=True, error_model="numpy")
def quantize_q8_k_rows(x, q, d, sums):  # [M, K] f32 -> q [M, K] int8, d [M, K/256] f32, sums [M, K/32] int32
    # d = max/−127 where max is the value of largest magnitude (its sign kept), q = round-half-even(x/d) capped at
    # 127; sums: each 32 values' sum of q, for Q4_K's mins (llama.cpp keeps sums of 16, its bsums)
    M, K = x.shape
    for m in range(M):
        for blk in range(K // 256):
            amax, vmax = np.float32(0.0), np.float32(0.0)
            for j in range(256):
                a = abs(x[m, blk * 256 + j])
                if a > amax:
                    amax, vmax = a, x[m, blk * 256 + j]
            iscale = np.float32(-127.0) / vmax if amax != 0 else np.float32(0.0)
            for j in range(256):
                q[m, blk * 256 + j] = np.int8(min(127, np.int32(np.rint(iscale * x[m, blk * 256 + j]))))
            d[m, blk] = np.float32(1.0) / iscale if amax != 0 else np.float32(0.0)
            for s in range(8):
                t = np.int32(0)
                for j in range(32):
                    t += np.int32(q[m, blk * 256 + 32 * s + j])
                sums[m, blk * 8 + s] = t


@njit(cache=True, nogil=True, fastmath=FAST, error_model="numpy")
def block_sums(x, sums):  # [M, K] f32 -> sums [M, K/32]: each 32 values' sum (Q4_K's mins, "float" path)
    M, K = x.shape
    for m in range(M):
        for s in range(K // 32):
            t = np.float32(0.0)
            for j in range(32):
                t += x[m, 32 * s + j]
            sums[m, s] = t


# ---- one row's dot product: "int8" (x as int8 blocks) ----------------------------------------------------------

# L, the run of 32 values that share a scale, arrives as an argument (always 32; Q6_K's runs are L // 2): with a
# trip count LLVM cannot see, it vectorises the inner loop (16 int8 products per instruction here) instead of
# unrolling it whole into scalar code, which it then failed to vectorise — the Q8_0 GEMV of a [3072, 1024] weight
# took 1.6 ms on one thread unrolled, 0.75 ms with L (AMD EPYC, AVX2, a busy machine).


@njit(cache=True, fastmath=FAST, error_model="numpy", inline="always")
def _dot_q8_0_int_loops(b, i8, xq, xd, L):  # row bytes, x's Q8_0 codes [K] and scales [K/32] -> float32
    acc = np.float32(0.0)
    for blk in range(xd.shape[0]):
        o = blk * 34
        s = np.int32(0)
        for j in range(L):
            s += np.int32(i8[o + 2 + j]) * np.int32(xq[blk * 32 + j])
        acc += _half(b, o) * xd[blk] * np.float32(s)
    return acc


@njit(cache=True, fastmath=FAST, error_model="numpy", inline="always")
def _dot_q4_k_int_loops(
    b, xq, xd, xs, L
):  # row bytes, x's Q8_K codes [K], scales [K/256], sums [K/32] -> float32
    acc = np.float32(0.0)
    for blk in range(xd.shape[0]):
        o = blk * 144
        dots = np.int32(0)  # Σ_s sc_s · Σ q·xq
        mins = np.int32(0)  # Σ_s m_s · Σ xq
        for g in range(4):
            sc1, m1 = _scale_min_k4(b, o + 4, 2 * g)
            sc2, m2 = _scale_min_k4(b, o + 4, 2 * g + 1)
            q, y = o + 16 + 32 * g, blk * 256 + 64 * g
            s1 = np.int32(0)
            s2 = np.int32(0)
            for l in range(L):
                s1 += np.int32(b[q + l] & 15) * np.int32(xq[y + l])
                s2 += np.int32(b[q + l] >> 4) * np.int32(xq[y + 32 + l])
            dots += sc1 * s1 + sc2 * s2
            mins += m1 * xs[blk * 8 + 2 * g] + m2 * xs[blk * 8 + 2 * g + 1]
        acc += xd[blk] * (_half(b, o) * np.float32(dots) - _half(b, o + 2) * np.float32(mins))
    return acc


@njit(cache=True, fastmath=FAST, error_model="numpy", inline="always")
def _dot_q6_k_int_loops(
    b, i8, xq, xd, L
):  # row bytes (and as int8), x's Q8_K codes [K] and scales [K/256] -> float32
    acc = np.float32(0.0)
    for blk in range(xd.shape[0]):
        o = blk * 210
        total = np.int32(0)
        for h in range(2):
            ql, qh, sc, y = o + 64 * h, o + 128 + 32 * h, o + 192 + 8 * h, blk * 256 + 128 * h
            for s in range(2):  # 16 values share a scale
                s1 = np.int32(0)
                s2 = np.int32(0)
                s3 = np.int32(0)
                s4 = np.int32(0)
                for i in range(L // 2):
                    l = 16 * s + i
                    lo, hi, top = np.int32(b[ql + l]), np.int32(b[ql + 32 + l]), np.int32(b[qh + l])
                    s1 += (((lo & 15) | ((top & 3) << 4)) - 32) * np.int32(xq[y + l])
                    s2 += (((hi & 15) | (((top >> 2) & 3) << 4)) - 32) * np.int32(xq[y + 32 + l])
                    s3 += (((lo >> 4) | (((top >> 4) & 3) << 4)) - 32) * np.int32(xq[y + 64 + l])
                    s4 += (((hi >> 4) | (((top >> 6) & 3) << 4)) - 32) * np.int32(xq[y + 96 + l])
                total += (
                    np.int32(i8[sc + s]) * s1
                    + np.int32(i8[sc + s + 2]) * s2
                    + np.int32(i8[sc + s + 4]) * s3
                    + np.int32(i8[sc + s + 6]) * s4
                )
        acc += xd[blk] * _half(b, o + 208) * np.float32(total)
    return acc


# (The MoE kernels take these block dots; the dense GEMV, the row dots further down.)
# The same three on AVX2 (backends/numba/avx2.py: 32 int8 products per instruction, as llama.cpp's kernels): the
# integer sums are exact either way, so both give the same floats; the loops stay for CPUs without AVX2.


@njit(cache=True, fastmath=FAST, error_model="numpy", inline="always")
def _dot_q8_0_int_avx2(b, i8, xq, xd, L):
    acc = np.float32(0.0)
    for blk in range(xd.shape[0]):
        o = blk * 34
        acc += _half(b, o) * xd[blk] * np.float32(avx2.q8_0_dot32(i8, o + 2, xq, blk * 32))
    return acc


@njit(cache=True, fastmath=FAST, error_model="numpy", inline="always")
def _dot_q4_k_int_avx2(b, xq, xd, xs, L):
    acc = np.float32(0.0)
    for blk in range(xd.shape[0]):
        o = blk * 144
        s0, m0 = _scale_min_k4(b, o + 4, 0)
        s1, m1 = _scale_min_k4(b, o + 4, 1)
        s2, m2 = _scale_min_k4(b, o + 4, 2)
        s3, m3 = _scale_min_k4(b, o + 4, 3)
        s4, m4 = _scale_min_k4(b, o + 4, 4)
        s5, m5 = _scale_min_k4(b, o + 4, 5)
        s6, m6 = _scale_min_k4(b, o + 4, 6)
        s7, m7 = _scale_min_k4(b, o + 4, 7)
        dots = avx2.q4_k_dot256(b, o + 16, xq, blk * 256, s0, s1, s2, s3, s4, s5, s6, s7)
        x8 = blk * 8
        mins = (
            m0 * xs[x8] + m1 * xs[x8 + 1] + m2 * xs[x8 + 2] + m3 * xs[x8 + 3]
            + m4 * xs[x8 + 4] + m5 * xs[x8 + 5] + m6 * xs[x8 + 6] + m7 * xs[x8 + 7]
        )  # fmt: skip
        acc += xd[blk] * (_half(b, o) * np.float32(dots) - _half(b, o + 2) * np.float32(mins))
    return acc


@njit(cache=True, fastmath=FAST, error_model="numpy", inline="always")
def _dot_q6_k_int_avx2(b, i8, xq, xd, L):
    acc = np.float32(0.0)
    for blk in range(xd.shape[0]):
        o = blk * 210
        acc += xd[blk] * _half(b, o + 208) * np.float32(avx2.q6_k_dot256(b, i8, o, xq, blk * 256))
    return acc


if avx2.HAS_AVX2:
    _dot_q8_0_int, _dot_q4_k_int, _dot_q6_k_int = _dot_q8_0_int_avx2, _dot_q4_k_int_avx2, _dot_q6_k_int_avx2
else:
    _dot_q8_0_int, _dot_q4_k_int, _dot_q6_k_int = (
        _dot_q8_0_int_loops,
        _dot_q4_k_int_loops,
        _dot_q6_k_int_loops,
    )


# ---- one row's dot product, the dense GEMV's: the block loop with eight float lanes ----------------------------

# The block dots above hand back one int32 per block, scaled and added as a scalar: a horizontal add and a scalar
# multiply-add per block (Q8_0: 32 a row of 1024). The dense GEMV instead keeps eight float32 lanes across the row
# (avx2.py's row intrinsics, the loop in IR): lane i gathers, per block, the integer products of values 4i..4i+3 of
# each run of 32 (weighted by their sub-block scales), converted once and scaled by d·d_x (Q4_K: minus the mins'
# term of sub-block i, dmin·d_x·m_i·Σx_i); the lanes are summed in order at the end. The loops below do the same
# operations on the same lanes without fast-math, so the two give equal bits (tested); they run where the CPU has
# no AVX2. A row's value differs from the block dots' only in float32 rounding (the order of the scaled sums).


@njit(cache=True, error_model="numpy", inline="always")
def _lanes_total(acc):  # ((0 + acc[0]) + acc[1]) + ... : the row intrinsics' ordered sum
    t = np.float32(0.0)
    for i in range(8):
        t += acc[i]
    return t


@njit(cache=True, error_model="numpy")
def _row_q8_0_loops(w, w8, n, a, ad, m, acc):  # row n of w [N, bytes] (and as int8) · row m of x's Q8_0 codes
    # a [M, K] and scales ad [M, K/32]; acc [8] scratch
    b, i8, xq, xd = w[n], w8[n], a[m], ad[m]
    acc[:] = np.float32(0.0)
    for blk in range(xd.shape[0]):
        o = blk * 34
        scale = _half(b, o) * xd[blk]
        for i in range(8):
            s = np.int32(0)
            for j in range(4 * i, 4 * i + 4):
                s += np.int32(i8[o + 2 + j]) * np.int32(xq[blk * 32 + j])
            acc[i] = acc[i] + np.float32(s) * scale
    return _lanes_total(acc)


@njit(cache=True, error_model="numpy")
def _row_q4_k_loops(w, n, a, ad, asum, m, acc):  # row n of w · row m of x's Q8_K codes, scales, sums of 32
    b, xq, xd, xs = w[n], a[m], ad[m], asum[m]
    acc[:] = np.float32(0.0)
    for blk in range(xd.shape[0]):
        o = blk * 144
        dd, dm = _half(b, o) * xd[blk], _half(b, o + 2) * xd[blk]
        for i in range(8):
            dots = np.int32(0)
            for s in range(8):  # sub-block s: byte l of group s // 2, its low (s even) or high nibble
                sc, _ = _scale_min_k4(b, o + 4, s)
                q, y = o + 16 + 32 * (s // 2), blk * 256 + 32 * s
                t = np.int32(0)
                for j in range(4 * i, 4 * i + 4):
                    code = b[q + j] & 15 if s % 2 == 0 else b[q + j] >> 4
                    t += np.int32(code) * np.int32(xq[y + j])
                dots += sc * t
            _, m = _scale_min_k4(b, o + 4, i)
            acc[i] = acc[i] + np.float32(dots) * dd
            acc[i] = acc[i] - np.float32(m * xs[blk * 8 + i]) * dm
    return _lanes_total(acc)


@njit(cache=True, error_model="numpy")
def _row_q6_k_loops(w, w8, n, a, ad, m, acc):  # row n of w (and as int8) · row m of x's Q8_K codes and scales
    b, i8, xq, xd = w[n], w8[n], a[m], ad[m]
    acc[:] = np.float32(0.0)
    for blk in range(xd.shape[0]):
        o = blk * 210
        dd = _half(b, o + 208) * xd[blk]
        for i in range(8):
            total = np.int32(0)
            for h in range(2):
                for run in range(4):  # run r of 32: the nibble r // 2 of ql[32·(r % 2) + l], bits 2r of qh[l]
                    t = np.int32(0)
                    for j in range(4 * i, 4 * i + 4):
                        lo = np.int32(b[o + 64 * h + 32 * (run % 2) + j])
                        nib = lo & 15 if run < 2 else lo >> 4
                        top = (np.int32(b[o + 128 + 32 * h + j]) >> (2 * run)) & 3
                        t += ((nib | (top << 4)) - 32) * np.int32(xq[blk * 256 + 128 * h + 32 * run + j])
                    total += np.int32(i8[o + 192 + 8 * h + 2 * run + i // 4]) * t
            acc[i] = acc[i] + np.float32(total) * dd
    return _lanes_total(acc)


@njit(cache=True, error_model="numpy", inline="always")
def _row_q8_0_avx2(w, w8, n, a, ad, m, acc):
    return avx2.q8_0_row(w, a, ad, n, m)


@njit(cache=True, error_model="numpy", inline="always")
def _row_q4_k_avx2(w, n, a, ad, asum, m, acc):
    return avx2.q4_k_row(w, a, ad, asum, n, m)


@njit(cache=True, error_model="numpy", inline="always")
def _row_q6_k_avx2(w, w8, n, a, ad, m, acc):
    return avx2.q6_k_row(w, a, ad, n, m)


@njit(cache=True, error_model="numpy", inline="always")
def _row_q8_0_vnni(w, w8, n, a, ad, m, acc):
    return avx2.q8_0_row_vnni(w, a, ad, n, m)


@njit(cache=True, error_model="numpy", inline="always")
def _row_q8_0_vnni512(w, w8, n, a, ad, m, acc):
    return avx2.q8_0_row_vnni512(w, a, ad, n, m)


if avx2.HAS_AVX2:
    _row_q8_0, _row_q4_k, _row_q6_k = _row_q8_0_avx2, _row_q4_k_avx2, _row_q6_k_avx2
    # VNNI's `vpdpbusd` (avx2.py), the same bits: one thread over Q8_0 rows of K = 1024 from L2, 1.07x on
    # 256-bit registers and 1.17x on 512-bit ones (two blocks an instruction); from memory (60000 rows)
    # 1.02-1.06x (AMD Zen 5, 2 shared cores, same process, interleaved, best of 7)
    if avx2.HAS_VNNI_512:
        _row_q8_0 = _row_q8_0_vnni512
    elif avx2.HAS_VNNI:
        _row_q8_0 = _row_q8_0_vnni
else:
    _row_q8_0, _row_q4_k, _row_q6_k = _row_q8_0_loops, _row_q4_k_loops, _row_q6_k_loops


# ---- one row's dot product: "float" (codes widened in registers, x as it is) ----------------------------------


@njit(cache=True, fastmath=FAST, error_model="numpy", inline="always")
def _dot_q8_0_float(b, i8, x, L):  # row bytes, x [K] f32 -> float32
    acc = np.float32(0.0)
    for blk in range(x.shape[0] // 32):
        o = blk * 34
        s = np.float32(0.0)
        for j in range(L):
            s += np.float32(i8[o + 2 + j]) * x[blk * 32 + j]
        acc += _half(b, o) * s
    return acc


@njit(cache=True, fastmath=FAST, error_model="numpy", inline="always")
def _dot_q4_k_float(b, x, xs, L):  # row bytes, x [K] f32, its sums of 32 [K/32] -> float32
    acc = np.float32(0.0)
    for blk in range(x.shape[0] // 256):
        o = blk * 144
        dots = np.float32(0.0)
        mins = np.float32(0.0)
        for g in range(4):
            sc1, m1 = _scale_min_k4(b, o + 4, 2 * g)
            sc2, m2 = _scale_min_k4(b, o + 4, 2 * g + 1)
            q, y = o + 16 + 32 * g, blk * 256 + 64 * g
            s1 = np.float32(0.0)
            s2 = np.float32(0.0)
            for l in range(L):
                s1 += np.float32(b[q + l] & 15) * x[y + l]
                s2 += np.float32(b[q + l] >> 4) * x[y + 32 + l]
            dots += np.float32(sc1) * s1 + np.float32(sc2) * s2
            mins += np.float32(m1) * xs[blk * 8 + 2 * g] + np.float32(m2) * xs[blk * 8 + 2 * g + 1]
        acc += _half(b, o) * dots - _half(b, o + 2) * mins
    return acc


@njit(cache=True, fastmath=FAST, error_model="numpy", inline="always")
def _dot_q6_k_float(b, i8, x, L):  # row bytes (and as int8), x [K] f32 -> float32
    acc = np.float32(0.0)
    for blk in range(x.shape[0] // 256):
        o = blk * 210
        total = np.float32(0.0)
        for h in range(2):
            ql, qh, sc, y = o + 64 * h, o + 128 + 32 * h, o + 192 + 8 * h, blk * 256 + 128 * h
            for s in range(2):
                s1 = np.float32(0.0)
                s2 = np.float32(0.0)
                s3 = np.float32(0.0)
                s4 = np.float32(0.0)
                for i in range(L // 2):
                    l = 16 * s + i
                    lo, hi, top = np.int32(b[ql + l]), np.int32(b[ql + 32 + l]), np.int32(b[qh + l])
                    s1 += np.float32(((lo & 15) | ((top & 3) << 4)) - 32) * x[y + l]
                    s2 += np.float32(((hi & 15) | (((top >> 2) & 3) << 4)) - 32) * x[y + 32 + l]
                    s3 += np.float32(((lo >> 4) | (((top >> 4) & 3) << 4)) - 32) * x[y + 64 + l]
                    s4 += np.float32(((hi >> 4) | (((top >> 6) & 3) << 4)) - 32) * x[y + 96 + l]
                total += (
                    np.float32(i8[sc + s]) * s1
                    + np.float32(i8[sc + s + 2]) * s2
                    + np.float32(i8[sc + s + 4]) * s3
                    + np.float32(i8[sc + s + 6]) * s4
                )
        acc += _half(b, o + 208) * total
    return acc


# ---- the GEMV: rows of several weights as one row space, chunks over the threads -------------------------------


@njit(cache=True, fastmath=FAST, error_model="numpy", inline="always")
def _dot(kind, use_int, b, i8, x, a0q, a0d, akq, akd, aks, xs, L):  # one weight row · one activation row
    if use_int:
        if kind == Q8_0:
            return _dot_q8_0_int(b, i8, a0q, a0d, L)
        if kind == Q4_K:
            return _dot_q4_k_int(b, akq, akd, aks, L)
        return _dot_q6_k_int(b, i8, akq, akd, L)
    if kind == Q8_0:
        return _dot_q8_0_float(b, i8, x, L)
    if kind == Q4_K:
        return _dot_q4_k_float(b, x, xs, L)
    return _dot_q6_k_float(b, i8, x, L)


@njit(cache=True, fastmath=FAST, error_model="numpy")
def _gemv_rows(use_int, kinds, ws, ws8, outs, starts, acts, lo, hi):  # rows lo..hi of the stacked row space
    x, a0q, a0d, akq, akd, aks, xs, L = acts
    M = x.shape[0]
    i = 0
    for r in range(lo, hi):
        while r >= starts[i + 1]:
            i += 1
        w, w8, out, n, kind = ws[i], ws8[i], outs[i], r - starts[i], kinds[i]
        for m in range(M):
            out[m, n] = _dot(
                kind, use_int, w[n], w8[n], x[m], a0q[m], a0d[m], akq[m], akd[m], aks[m], xs[m], L
            )


@njit(cache=True, error_model="numpy", inline="always")
def _row(kind, w, w8, n, acts, m, acc):  # row n of w [N, bytes] · row m of x (its int8 forms), lane-kept
    a0q, a0d, akq, akd, aks = acts
    if kind == Q8_0:
        return _row_q8_0(w, w8, n, a0q, a0d, m, acc)
    if kind == Q4_K:
        return _row_q4_k(w, n, akq, akd, aks, m, acc)
    return _row_q6_k(w, w8, n, akq, akd, m, acc)


@njit(cache=True, error_model="numpy", inline="always")
def _rows_int(kind, w, w8, out, first, acts, r0, r1, acc):  # rows r0..r1 of the row space: w's rows r - first
    # One loop per format, the format chosen once per call: with `_row`'s choice inside the row loop, LLVM kept
    # the three row dots' constants and sums in one loop body, spilled them and moved them between registers
    # every block (one thread, 16-64 Q4_K rows from L2: 1.6-2.6x slower per row; the same bits either way)
    a0q, a0d, akq, akd, aks = acts
    M = out.shape[0]
    if kind == Q8_0:
        for r in range(r0, r1):
            for m in range(M):
                out[m, r - first] = _row_q8_0(w, w8, r - first, a0q, a0d, m, acc)
    elif kind == Q4_K:
        for r in range(r0, r1):
            for m in range(M):
                out[m, r - first] = _row_q4_k(w, r - first, akq, akd, aks, m, acc)
    else:
        for r in range(r0, r1):
            for m in range(M):
                out[m, r - first] = _row_q6_k(w, w8, r - first, akq, akd, m, acc)


@njit(cache=True, error_model="numpy")
def _gemv_rows_int(kinds, ws, ws8, outs, starts, acts, lo, hi):  # the same, "int8": the lane-kept row dots
    # (no fast-math here: the row dots' float order is fixed, see above). Whole arrays and row numbers go to the
    # row dots, no row views: see avx2._Row
    acc = np.empty(8, np.float32)  # the plain loops' lanes
    for i in range(len(ws)):
        r0, r1 = max(lo, starts[i]), min(hi, starts[i + 1])
        if r0 >= r1:
            continue
        _rows_int(kinds[i], ws[i], ws8[i], outs[i], starts[i], acts, r0, r1, acc)


@njit(cache=True, error_model="numpy")
def _quantize_acts(x, need0, needk):  # x [M, K] -> (Q8_0 codes, scales, Q8_K codes, scales, sums), as needed
    M, K = x.shape
    a0q = np.empty((M, K if need0 else 0), np.int8)
    a0d = np.empty((M, K // 32 if need0 else 0), np.float32)
    akq = np.empty((M, K if needk else 0), np.int8)
    akd = np.empty((M, K // 256 if needk else 0), np.float32)
    aks = np.empty((M, K // 32 if needk else 0), np.int32)
    if need0:
        quantize_q8_0_rows(x, a0q, a0d)
    if needk:
        quantize_q8_k_rows(x, akq, akd, aks)
    return a0q, a0d, akq, akd, aks


@njit(parallel=True, cache=True, nogil=True)
def _gemv_many_int(kinds, ws, ws8, outs, starts, x, need0, needk, chunks):
    # "int8" in one call: x quantized once (serially, on the calling thread) for all n weights, then their rows as
    # one row space over the threads, as _gemv_many
    acts = _quantize_acts(x, need0, needk)
    total = starts[-1]
    chunks = min(total, chunks)
    size = (total + chunks - 1) // chunks
    for c in prange(chunks):
        _gemv_rows_int(kinds, ws, ws8, outs, starts, acts, c * size, min(total, (c + 1) * size))


@njit(cache=True, error_model="numpy")
def _gate_up_rows_int(kg, g, g8, ku, u, u8, acts, h, lo, hi):  # hidden units lo..hi: h = silu(x·g)·(x·u)
    acc = np.empty(8, np.float32)
    for f in range(lo, hi):
        for m in range(h.shape[0]):
            h[m, f] = _silu(_row(kg, g, g8, f, acts, m, acc)) * _row(ku, u, u8, f, acts, m, acc)


@njit(parallel=True, cache=True, nogil=True)
def _swiglu_int(kinds, g, g8, u, u8, d, d8, x, need, h, out, starts, chunks):
    # decode's whole quantized SwiGLU in one call (as linear.py's _swiglu_bf16): x quantized, gate and up with
    # SiLU·mul over the threads into h [M, F], h quantized, down over the threads into out [M, K]. kinds: (gate,
    # up, down); need: (Q8_0 for x, Q8_K for x, Q8_0 for h, Q8_K for h)
    acts = _quantize_acts(x, need[0], need[1])
    F = h.shape[1]
    c1 = min(F, chunks)
    size = (F + c1 - 1) // c1
    for c in prange(c1):
        _gate_up_rows_int(kinds[0], g, g8, kinds[1], u, u8, acts, h, c * size, min(F, (c + 1) * size))
    acts_h = _quantize_acts(h, need[2], need[3])
    total = d.shape[0]
    c2 = min(total, chunks)
    size2 = (total + c2 - 1) // c2
    for c in prange(c2):
        _gemv_rows_int(kinds[2:], (d,), (d8,), (out,), starts, acts_h, c * size2, min(total, (c + 1) * size2))


@njit(parallel=True, cache=True, nogil=True)
def _gemv_many(use_int, kinds, ws, ws8, outs, starts, acts, chunks):
    # n weights' rows as one row space (starts: cumulative row counts), split into chunks over the threads: one
    # parallel launch for q, k and v (or gate and up) together, as the bf16 GEMV in linear.py ("float"; the MoE
    # kernels' acts)
    total = starts[-1]
    chunks = min(total, chunks)
    size = (total + chunks - 1) // chunks
    for c in prange(chunks):
        _gemv_rows(use_int, kinds, ws, ws8, outs, starts, acts, c * size, min(total, (c + 1) * size))


def _needs(kinds) -> tuple[bool, bool]:  # which int8 forms of x weights of these formats read: (Q8_0, Q8_K)
    return Q8_0 in kinds, Q4_K in kinds or Q6_K in kinds


def activations(x2: np.ndarray, kinds, use_int: bool) -> tuple:
    """The forms of x [M, K] the kernels read: (x, Q8_0 codes, Q8_0 scales, Q8_K codes, Q8_K scales, Q8_K sums of
    32, float sums of 32, L); a form no weight of `kinds` needs is an empty placeholder (same types, no work)."""
    M, K = x2.shape
    need0 = use_int and Q8_0 in kinds
    needk = use_int and (Q4_K in kinds or Q6_K in kinds)
    needs = not use_int and Q4_K in kinds
    a0q = np.empty((M, K if need0 else 0), np.int8)
    a0d = np.empty((M, K // 32 if need0 else 0), np.float32)
    akq = np.empty((M, K if needk else 0), np.int8)
    akd = np.empty((M, K // 256 if needk else 0), np.float32)
    aks = np.empty((M, K // 32 if needk else 0), np.int32)
    xs = np.empty((M, K // 32 if needs else 0), np.float32)
    if need0:
        quantize_q8_0_rows(x2, a0q, a0d)
    if needk:
        quantize_q8_k_rows(x2, akq, akd, aks)
    if needs:
        block_sums(x2, xs)
    return x2, a0q, a0d, akq, akd, aks, xs, 32  # (32: L, the run length, see the dot products)


def gemv(x2: np.ndarray, ws: tuple, use_int: bool, chunks: int, starts: np.ndarray) -> tuple:
    # [M, K] f32, n quantized weights (QuantWeight) -> n x [M, N_i] f32, in one parallel launch
    kinds = np.array([w.kind for w in ws], np.int64)
    outs = tuple(np.empty((x2.shape[0], w.shape[0]), np.float32) for w in ws)
    data, data8 = tuple(w.data for w in ws), tuple(w.data8 for w in ws)
    if use_int:  # the activation quantized inside the call
        _gemv_many_int(kinds, data, data8, outs, starts, x2, *_needs(set(kinds.tolist())), chunks)
        return outs
    acts = activations(x2, set(kinds.tolist()), use_int)
    _gemv_many(use_int, kinds, data, data8, outs, starts, acts, chunks)
    return outs


def swiglu_int(x2: np.ndarray, gate, up, down, chunks: int, starts: np.ndarray) -> np.ndarray:
    # [M, K] f32, QuantWeight [F, K] x2 and [K, F] -> [M, K] f32: decode's SwiGLU, "int8", in one call
    kinds = np.array([gate.kind, up.kind, down.kind], np.int64)
    need = np.array([*_needs({gate.kind, up.kind}), *_needs({down.kind})])
    h = np.empty((x2.shape[0], gate.shape[0]), np.float32)
    out = np.empty((x2.shape[0], down.shape[0]), np.float32)
    _swiglu_int(
        kinds,
        gate.data,
        gate.data8,
        up.data,
        up.data8,
        down.data,
        down.data8,
        x2,
        need,
        h,
        out,
        starts,
        chunks,
    )
    return out


# ---- MoE decode: every (token, expert) pair of a step in one launch ------------------------------------------


@njit(cache=True, fastmath=FAST, error_model="numpy")
def _moe_up_rows(use_int, kg, ku, g, g8, u, u8, acts, experts, h, p, lo, hi):  # hidden units lo..hi of pair p
    x, a0q, a0d, akq, akd, aks, xs, L = acts
    k = experts.shape[1]
    t, e = p // k, experts[p // k, p % k]
    for f in range(lo, hi):
        gv = _dot(kg, use_int, g[e, f], g8[e, f], x[t], a0q[t], a0d[t], akq[t], akd[t], aks[t], xs[t], L)
        uv = _dot(ku, use_int, u[e, f], u8[e, f], x[t], a0q[t], a0d[t], akq[t], akd[t], aks[t], xs[t], L)
        h[p, f] = _silu(gv) * uv


@njit(parallel=True, cache=True, nogil=True)
def moe_up(use_int, kg, ku, g, g8, u, u8, acts, experts, h, chunks):
    # acts of x [N, d]; g/u [E, F, bytes] -> h [N·k, F] = silu(x Wgᵀ)·(x Wuᵀ) for each (token, slot) pair
    P = experts.shape[0] * experts.shape[1]
    F = h.shape[1]
    per = min(F, max(1, chunks // P + 1))
    size = (F + per - 1) // per
    for job in prange(P * per):
        p, c = job // per, job % per
        _moe_up_rows(use_int, kg, ku, g, g8, u, u8, acts, experts, h, p, c * size, min(F, (c + 1) * size))


@njit(cache=True, fastmath=FAST, error_model="numpy")
def _moe_down_rows(use_int, kd, w, w8, acts, experts, weights, out, lo, hi):  # output features lo..hi
    x, a0q, a0d, akq, akd, aks, xs, L = acts  # of h [N·k, F]
    N, k = experts.shape
    for i in range(lo, hi):
        for t in range(N):
            total = np.float32(0.0)
            for s in range(k):  # the token's experts, summed in slot order
                e, p = experts[t, s], t * k + s
                total += weights[t, s] * _dot(
                    kd, use_int, w[e, i], w8[e, i], x[p], a0q[p], a0d[p], akq[p], akd[p], aks[p], xs[p], L
                )
            out[t, i] = total


@njit(parallel=True, cache=True, nogil=True)
def moe_down(use_int, kd, w, w8, acts, experts, weights, out, chunks):  # w [E, d, bytes] -> out [N, d]
    d = out.shape[1]
    rows = min(d, chunks)
    size = (d + rows - 1) // rows
    for c in prange(rows):
        _moe_down_rows(use_int, kd, w, w8, acts, experts, weights, out, c * size, min(d, (c + 1) * size))


# ---- MoE, "int8", on the dense GEMV's row dots --------------------------------------------------------------
# The kernels above call the block dots on row views (g[e, f]): each view costs atomic reference-count updates on
# the weight's count, shared by the threads (the dense GEMV ran at 0.4x a plain loop that way, see avx2._Row), and
# the block dots reduce every block to a scalar. These take the dense GEMV's row dots instead (eight float lanes
# across the row), on the expert stack seen as one [E·F, bytes] matrix (a reshape, no copy) and a row number
# e·F + f. Decode and prefill call the same row dot and both sum a token's experts in `moe_combine`, so the two
# still give equal bits. The row dots round differently from the block dots (the order of the scaled sums).


@njit(cache=True, error_model="numpy")
def _moe_up_rows_int(kg, ku, g, g8, u, u8, F, acts, experts, h, p, lo, hi):  # hidden units lo..hi of pair p
    k = experts.shape[1]
    t, e = p // k, experts[p // k, p % k]
    acc = np.empty(8, np.float32)  # (the plain loops' lanes)
    for f in range(lo, hi):
        r = e * F + f
        h[p, f] = _silu(_row(kg, g, g8, r, acts, t, acc)) * _row(ku, u, u8, r, acts, t, acc)


@njit(parallel=True, cache=True, nogil=True)
def moe_up_int(kg, ku, g, g8, u, u8, acts, experts, h, chunks):
    # acts: x's int8 forms (Q8_0 codes, scales, Q8_K codes, scales, sums); g/u [E·F, bytes] -> h [N·k, F]
    P = experts.shape[0] * experts.shape[1]
    F = h.shape[1]
    per = min(F, max(1, chunks // P + 1))
    size = (F + per - 1) // per
    for job in prange(P * per):
        p, c = job // per, job % per
        _moe_up_rows_int(kg, ku, g, g8, u, u8, F, acts, experts, h, p, c * size, min(F, (c + 1) * size))


@njit(cache=True, error_model="numpy")
def _moe_down_rows_int(kd, w, w8, d, acts, experts, y, lo, hi):  # output features lo..hi of every pair
    N, k = experts.shape
    acc = np.empty(8, np.float32)
    for i in range(lo, hi):
        for p in range(N * k):
            y[p, i] = _row(kd, w, w8, experts[p // k, p % k] * d + i, acts, p, acc)


@njit(parallel=True, cache=True, nogil=True)
def moe_down_int(kd, w, w8, acts, experts, y, chunks):  # acts of h [N·k, F]; w [E·d, bytes] -> y [N·k, d]
    d = y.shape[1]
    rows = min(d, chunks)
    size = (d + rows - 1) // rows
    for c in prange(rows):
        _moe_down_rows_int(kd, w, w8, d, acts, experts, y, c * size, min(d, (c + 1) * size))


@njit(cache=True, error_model="numpy")
def _moe_up_group_int(kg, ku, g, g8, u, u8, F, acts, k, e, order, b0, b1, h, lo, hi):  # rows lo..hi of e
    acc = np.empty(8, np.float32)
    for f in range(lo, hi):  # each row once, dotted with every token that chose e while it sits in L1
        r = e * F + f
        for j in range(b0, b1):
            p = order[j]
            t = p // k
            h[p, f] = _silu(_row(kg, g, g8, r, acts, t, acc)) * _row(ku, u, u8, r, acts, t, acc)


@njit(parallel=True, cache=True, nogil=True)
def moe_up_grouped_int(kg, ku, g, g8, u, u8, acts, k, groups, order, bounds, per, h):
    # moe_up_grouped on the row dots: g/u [E·F, bytes] (no slices of order either: indices into it)
    F = h.shape[1]
    size = (F + per - 1) // per
    for job in prange(groups.shape[0] * per):
        j, c = job // per, job % per
        _moe_up_group_int(
            kg, ku, g, g8, u, u8, F, acts, k, groups[j], order, bounds[j], bounds[j + 1], h, c * size,
            min(F, (c + 1) * size),
        )  # fmt: skip


@njit(cache=True, error_model="numpy")
def _moe_down_group_int(kd, w, w8, d, acts, e, order, b0, b1, y, lo, hi):  # output features lo..hi of e
    acc = np.empty(8, np.float32)
    for i in range(lo, hi):
        r = e * d + i
        for j in range(b0, b1):
            p = order[j]
            y[p, i] = _row(kd, w, w8, r, acts, p, acc)


@njit(parallel=True, cache=True, nogil=True)
def moe_down_grouped_int(kd, w, w8, acts, groups, order, bounds, per, y):  # w [E·d, bytes] -> y [N·k, d]
    d = y.shape[1]
    size = (d + per - 1) // per
    for job in prange(groups.shape[0] * per):
        j, c = job // per, job % per
        _moe_down_group_int(
            kd,
            w,
            w8,
            d,
            acts,
            groups[j],
            order,
            bounds[j],
            bounds[j + 1],
            y,
            c * size,
            min(d, (c + 1) * size),
        )


# ---- MoE prefill: the (token, expert) pairs grouped by expert, each expert's rows read once for all its tokens ---
# llama.cpp's scheme for a prompt (its mul_mat_id): the activations quantized once, then each routed expert's rows
# dotted with every token that chose it while the row sits in L1 — an expert's blocks leave memory once per call,
# however many tokens share it, and the unchosen experts are never read.


@njit(cache=True, fastmath=FAST, error_model="numpy")
def _moe_up_group(use_int, kg, ku, g, g8, u, u8, acts, k, e, pairs, h, lo, hi):  # rows lo..hi of expert e
    x, a0q, a0d, akq, akd, aks, xs, L = acts
    for f in range(lo, hi):
        for p in pairs:  # the pairs (token·k + slot) that chose e
            t = p // k
            gv = _dot(kg, use_int, g[e, f], g8[e, f], x[t], a0q[t], a0d[t], akq[t], akd[t], aks[t], xs[t], L)
            uv = _dot(ku, use_int, u[e, f], u8[e, f], x[t], a0q[t], a0d[t], akq[t], akd[t], aks[t], xs[t], L)
            h[p, f] = _silu(gv) * uv


@njit(parallel=True, cache=True, nogil=True)
def moe_up_grouped(use_int, kg, ku, g, g8, u, u8, acts, k, groups, order, bounds, per, h):
    # acts of x [N, d]; g/u [E, F, bytes]; groups [G] the routed experts, order [N·k] the pairs sorted by expert,
    # bounds [G + 1] each expert's run in order; per: row chunks per expert -> h [N·k, F] (written)
    F = h.shape[1]
    size = (F + per - 1) // per
    for job in prange(groups.shape[0] * per):
        j, c = job // per, job % per
        pairs = order[bounds[j] : bounds[j + 1]]
        _moe_up_group(
            use_int, kg, ku, g, g8, u, u8, acts, k, groups[j], pairs, h, c * size, min(F, (c + 1) * size)
        )


@njit(cache=True, fastmath=FAST, error_model="numpy")
def _moe_down_group(use_int, kd, w, w8, acts, e, pairs, y, lo, hi):  # output features lo..hi of expert e
    x, a0q, a0d, akq, akd, aks, xs, L = acts  # of h [N·k, F]
    for i in range(lo, hi):
        for p in pairs:
            y[p, i] = _dot(
                kd, use_int, w[e, i], w8[e, i], x[p], a0q[p], a0d[p], akq[p], akd[p], aks[p], xs[p], L
            )


@njit(parallel=True, cache=True, nogil=True)
def moe_down_grouped(use_int, kd, w, w8, acts, groups, order, bounds, per, y):
    # acts of h [N·k, F]; w [E, d, bytes] -> y [N·k, d]: each pair's expert output, unweighted (written)
    d = y.shape[1]
    size = (d + per - 1) // per
    for job in prange(groups.shape[0] * per):
        j, c = job // per, job % per
        pairs = order[bounds[j] : bounds[j + 1]]
        _moe_down_group(use_int, kd, w, w8, acts, groups[j], pairs, y, c * size, min(d, (c + 1) * size))


@njit(cache=True, nogil=True, fastmath=FAST, error_model="numpy")
def moe_combine(y, weights, out):  # y [N·k, d], routing weights [N, k] -> out [N, d]: summed in slot order
    N, k = weights.shape
    for t in range(N):
        for i in range(out.shape[1]):
            total = np.float32(0.0)
            for s in range(k):
                total += weights[t, s] * y[t * k + s, i]
            out[t, i] = total
