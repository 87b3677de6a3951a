"""The weight products: decode's bf16 GEMVs (streamed, each row widened in registers; a batched decode step of 2 to
GEMV_MAX_ROWS rows in register tiles of 4 token rows x 3 weight rows (x 6 on AVX-512 hosts), or from PANEL_MIN_ROWS
rows on token panels and a 6 x 16 micro-kernel, batch_gemm.py), prefill's token panels and 12 x 32 micro-kernel
where Numba compiles for AVX-512 (prefill_gemm.py), else widen-a-block + BLAS (or oneDNN's bf16 GEMM for
matmul_precision="medium"), and SwiGLU with its fused gate/up GEMV. Quantized
weights (`QuantWeight`) take two roads too: decode's GEMV over their blocks (`quant.py`; "int8": x quantized to
int8 blocks, integer dot products, llama.cpp's way; or "float": codes widened in registers), and prefill's int8
tiles ("int8", `quant_matmul.py`: four tokens per decoded weight row) or a block of rows dequantized into
prefill_gemm.py's panels on AVX-512, + BLAS elsewhere ("float", and the formats not in INT8_PREFILL).
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from functools import cache

import numba
import numpy as np
from numba import njit, prange

from tinyqwen.backends import onednn
from tinyqwen.backends.numba import batch_gemm, decode_tiles, prefill_gemm, quant, quant_matmul, quant_panels
from tinyqwen.backends.numba.gemv_one_row import _gemv1_many_bf16, _one_row_pairs, _swiglu1_bf16
from tinyqwen.backends.numba.intrinsics import FAST, _bf16, _prefetch_weight_row, _silu, round_bf16
from tinyqwen.backends.numba.weights import BF16Weight, QuantWeight
from tinyqwen.blas_threads import blas_threads

# the decode GEMV over quantized blocks, the first the default (see quant.py and benchmarks/bench_quant_gemv.py)
QUANT_GEMV = ("int8", "float")

GEMV_MAX_ROWS = 64  # up to this many tokens (a batched decode step) a product streams the bf16 weights
# quantized weights: up to this many tokens the GEMV over the blocks, beyond, prefill's products (INT8_PREFILL)
QUANT_GEMV_MAX_ROWS = 4
FUSED_SWIGLU = (
    True  # decode's bf16 SwiGLU as one call of two parallel loops (_swiglu_bf16); False: two launches
)
# 2+ token rows (a batched decode step): the register-tiled kernels; False: the one-row loops once per row
BATCH_TILES = True
# a batched step of PANEL_MIN_ROWS+ rows whose 16-row panels are at least PANEL_MIN_FILL full: batch_gemm.py's
# widened blocks and 6 x 16 micro-kernel instead of the tiles (fewer rows: the tiles, which waste no padding).
# Off: on two threads of a quiet AMD EPYC a whole 16-row step of Qwen3-0.6B ran 0.96-1.03x the tiles' speed and
# one layer's products x 28 0.52-0.60x (one thread, CPU time, busy machine: whole steps 1.06-1.08x); see
# benchmarks/bench_batch_decode.py and benchmarks/results/2026-12-07-batch-panels-busy.txt
BATCH_PANELS = False
PANEL_MIN_ROWS = 12
PANEL_MIN_FILL = 0.7
PANEL_CHUNKS_PER_THREAD = 2
# decode's SwiGLU over quantized weights in one call ("int8", quant.swiglu_int: x quantized, gate/up, h quantized, down in one call):
# off, as it measured slower than gate/up and down as two calls (Qwen3-0.6B q8_0, 2 threads, AMD EPYC, one run,
# interleaved: 68.6 ms a decode step fused, 60.6 ms in two calls)
FUSED_QUANT_SWIGLU = False


# prefill ("int8", more than QUANT_GEMV_MAX_ROWS tokens) with quantized weights: the tokens quantized to int8 blocks
# and dotted four at a time with each weight row's decoded blocks (quant_matmul.py, llama.cpp's scheme: the
# activations rounded as decode rounds them); False: blocks of rows widened to float32 into BLAS, as "float" always
# does. On one thread a 128-token prefill ran 0.97x BLAS's speed (Q4_K_M), 0.71x (q8_0); on two cores that other
# processes also load, 2.4-5.3x (quant_matmul.py's figures). On a quiet machine (2 cores, AMD EPYC, AVX2, one run,
# 128 tokens) the tiles ran 1.05x BLAS on Q4_K_M, 1.30x on the 2-layer 30B-A3B Q4_K_M, but 0.88x on q8_0: a q8_0
# block costs nothing to widen, and without VNNI two integer multiplies per 32 values cost what float FMAs do. So
# the formats listed take the tiles; the others (and every format when empty) the BLAS road.
# Where Numba compiles for AVX-512 none does: the dequantized blocks on prefill_gemm.py's panels (QUANT_PREFILL_PANELS) beat the
# tiles there. 128-token prefill of Qwen3-0.6B Q4_K_M, 2 threads, Zen 5, bench_quant_prefill.py (one process,
# interleaved, best of 5, three runs): 343-355 tok/s against the tiles' 249-259 (1.36-1.40x). The outputs move by
# the activations' 8-bit rounding the tiles had (a 128-token prompt's logits max|Δ| 2.9e-2 of max|logit|;
# 16 greedy ids the same)
# prefill's products with quantized weights not on the int8 tiles (every format under quant_gemv="float", the
# formats not in INT8_PREFILL under "int8") where Numba compiles for AVX-512: a block of rows dequantized into
# prefill_gemm.py's L2-resident buffer and its 12 x 32 micro-kernel over token panels (prefill_gemm.matmul_quant),
# instead of the block dequantized into BLAS's sgemm (OpenBLAS's AVX2 kernels on this CPU). The same math class:
# float32 products of the exactly dequantized weights. False, or no AVX-512: BLAS
QUANT_PREFILL_PANELS = True
INT8_PREFILL = () if QUANT_PREFILL_PANELS and prefill_gemm.available() else ("q4_k", "q6_k")
# prefill's q/k/v and gate/up products with quantized weights (INT8_PREFILL formats) in one parallel region each
# (quant_matmul.matmul_many: x quantized once); False: one region per weight. Qwen3-0.6B Q4_K_M, 128 tokens, 2
# threads at load 5.7: 88.6 against 83.2 tok/s with a quantization and a product launched per weight, as before
# (same process, interleaved, best of 4; the same bits)
QUANT_PREFILL_MANY = True


# float32 scratch for a block of weight rows in the BLAS path: every matrix of Qwen3-0.6B but the lm_head fits
# in one block (one sgemm call, as fast as NumPy's); 4 MiB blocks cost up to 1.7x in BLAS calls here (measured)
WIDEN_BLOCK_BYTES = 16 << 20
# quantized weights: a smaller block. Their files are meant to fit in little memory (peak RSS within 15 % of the
# file is the bar); a 16 MiB scratch was 2.5 % of a 0.6B q8_0 file on its own, and a prompt's [M, 1024] product
# with 1024 dequantized rows still keeps BLAS busy
QUANT_WIDEN_BLOCK_BYTES = 4 << 20
# prefill's dequantization of a block of quantized rows over the threads (quant.dequantize_rows_parallel);
# False: on one thread (quant.dequantize_rows). Off: the widening is a small part of the time (0.03 s of a 6 s
# MoE prefill) and over the threads it measured slower (Qwen3-30B-A3B's attn_output, 128 tokens: 0.33 s against
# 0.13 s, OpenBLAS's threads spinning beside numba's; 2 cores, a busy machine)
PARALLEL_QUANT_WIDEN = False


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


@njit(parallel=True, cache=True, nogil=True)
def _gemv_many_bf16(x, ws, outs, starts, chunks):  # [M, K] f32, n x [N_i, K] u16, n x [M, N_i] f32 (written)
    # every decode GEMV (n = 1: one weight; n = 3: q, k, v fused). The rows of all n weights as one row space
    # (starts: cumulative row counts), split into chunks over the threads: one parallel launch and one long stream
    # instead of n short ones
    total = starts[-1]
    chunks = min(total, chunks)
    size = (total + chunks - 1) // chunks
    for c in prange(chunks):
        _gemv_rows_bf16(x, ws, outs, starts, c * size, min(total, (c + 1) * size))


@njit(cache=True, nogil=True)
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


@njit(parallel=True, cache=True, nogil=True)
def _gate_up_bf16(
    x, w_gate, w_up, out, chunks
):  # [M, K] f32, [F, K] u16 x2 -> out [M, F]: silu(x Wgᵀ)·(x Wuᵀ)
    F = w_gate.shape[0]
    chunks = min(F, chunks)
    size = (F + chunks - 1) // chunks
    for c in prange(chunks):
        _gate_up_rows_bf16(x, w_gate, w_up, out, c * size, min(F, (c + 1) * size))


@njit(parallel=True, cache=True, nogil=True)
def _swiglu_bf16(x, w_gate, w_up, w_down, h, out, starts, chunks):
    # [M, K] f32, [F, K] u16 x2, [K, F] u16 -> h [M, F] (scratch), out [M, K]: decode's whole SwiGLU in one call.
    # The same two parallel loops as _gate_up_bf16 then _gemv_many_bf16, the same serial kernels (bit-identical
    # results), but one entry from Python instead of two: the threads go from the first loop to the second while
    # still spinning, instead of falling asleep in the Python between two launches and paying a wake-up
    F = w_gate.shape[0]
    c1 = min(F, chunks)
    size = (F + c1 - 1) // c1
    for c in prange(c1):
        _gate_up_rows_bf16(x, w_gate, w_up, h, c * size, min(F, (c + 1) * size))
    total = w_down.shape[0]
    c2 = min(total, chunks)
    size2 = (total + c2 - 1) // c2
    for c in prange(c2):
        _gemv_rows_bf16(h, (w_down,), (out,), starts, c * size2, min(total, (c + 1) * size2))


@njit(cache=True, nogil=True, fastmath=FAST, error_model="numpy")
def _silu_mul(g, u):  # [M, F] x2 -> [M, F]
    out = np.empty_like(g)
    M, F = g.shape
    for m in range(M):
        for f in range(F):
            out[m, f] = _silu(g[m, f]) * u[m, f]
    return out


def _chunks() -> int:  # work items for a parallel GEMV: several per thread, so a slow thread holds no one up
    return 8 * numba.get_num_threads()


def _panel_chunks() -> int:  # work items for batch_gemm.py's kernels: few, long ones
    # each work item's first block of weights is read from memory unprefetched (batch_gemm.py prefetches a block
    # during the one before it), so 16 items of a few blocks each lost up to a quarter of the gain
    return PANEL_CHUNKS_PER_THREAD * numba.get_num_threads()


def _workers() -> int:  # iterations of a one-region `prange` (phases.py): one per thread
    return numba.get_num_threads()


def _tiled(x2: np.ndarray) -> bool:  # a batched decode step's rows take the register tiles
    return BATCH_TILES and x2.shape[0] > 1


# "medium" (bf16_inputs) batched decode steps where Numba's target has AVX512-BF16 (and AVX-512's 4 x 6 tiles):
# decode_tiles.py's tiles on bf16 pairs and vdpbf16ps, the weights straight from their uint32 pairs; False: x
# rounded, then the float32 tiles. A 16-row step of Qwen3-0.6B: see decode_tiles.py
BATCH_DPBF16 = True


def _tiled_dpbf16(x2: np.ndarray, *bits) -> bool:  # a batched step's rows take the vdpbf16ps tiles
    return (
        BATCH_DPBF16
        and _tiled(x2)
        and decode_tiles.dpbf16_fits(x2.shape[1], *(b.shape[1] for b in bits))
        and all(b.flags.c_contiguous for b in bits)
    )


def _panelled(x2: np.ndarray, *ks: int) -> bool:  # a batched step's rows take batch_gemm.py's panels
    # (x2's width and any other product's inner size ks: multiples of the micro-kernel's unrolling)
    M = x2.shape[0]
    full = M / (batch_gemm.PANEL * -(-M // batch_gemm.PANEL))
    sizes_fit = all(k > 0 and k % batch_gemm.UNROLL == 0 for k in (x2.shape[1], *ks))
    return BATCH_PANELS and M >= PANEL_MIN_ROWS and full >= PANEL_MIN_FILL and sizes_fit


def _rows(x: np.ndarray) -> np.ndarray:  # [..., d] -> [M, d] float32, C-contiguous
    return np.ascontiguousarray(x, dtype=np.float32).reshape(-1, x.shape[-1])


# prefill's sgemm on dequantized blocks with this many OpenBLAS threads (None: as the process has it). Its threads
# and numba's share the cores: between the numba kernels of a layer, OpenBLAS's threads spin-wait and the next
# sgemm waits for numba's, so a 2-layer Qwen3-30B-A3B-shaped Q4_K_M took 6.4 s for a 128-token prompt with
# OpenBLAS's 2 threads, 1.7 s with 1 (its attention projections 4.3 s and 0.37 s; 2 cores, a busy machine). On a
# quiet machine the opposite: a 128-token prompt of Qwen3-0.6B q8_0 ran at 86 tok/s with OpenBLAS's 2 threads and
# 55 with 1 (Q4_K_M 88 vs 55; same process, interleaved, best of 3, AMD EPYC). So the default leaves BLAS as it
# is; set 1 where other processes keep the cores busy
QUANT_PREFILL_BLAS_THREADS: int | None = None


def _quant_linear(x2: np.ndarray, w: QuantWeight, quant_gemv: str) -> np.ndarray:  # [M, K], [N, K] -> [M, N]
    if x2.shape[0] <= QUANT_GEMV_MAX_ROWS or QUANT_PREFILL_BLAS_THREADS is None:
        return _quant_linear_blocks(x2, w, quant_gemv)
    with blas_threads(int(QUANT_PREFILL_BLAS_THREADS)):
        return _quant_linear_blocks(x2, w, quant_gemv)


def _quant_linear_blocks(
    x2: np.ndarray, w: QuantWeight, quant_gemv: str
) -> np.ndarray:  # [M, K], [N, K] -> [M, N]
    N, K = w.shape
    M = x2.shape[0]
    if M <= QUANT_GEMV_MAX_ROWS:  # decode: the GEMV over the blocks
        return quant.gemv(x2, (w,), quant_gemv == "int8", _chunks(), _starts((N,)))[0]
    if (
        w.qtype in INT8_PREFILL and quant_gemv == "int8"
    ):  # prefill on int8 tiles: each row's blocks decoded once per 4 tokens
        return quant_matmul.matmul(x2, w, _chunks())
    if QUANT_PREFILL_PANELS and prefill_gemm.available() and prefill_gemm.fits(K):
        # prefill on AVX-512: the dequantized blocks through prefill_gemm.py's panels and micro-kernel
        return prefill_gemm.matmul_quant(x2, w)
    # prefill: compute-bound, so BLAS on a block of rows dequantized at a time (float32 never the whole weight)
    block = max(1, min(N, QUANT_WIDEN_BLOCK_BYTES // (4 * K)))
    out = np.empty((M, N), np.float32)
    scratch = np.empty((block, K), np.float32)
    for start in range(0, N, block):
        stop = min(N, start + block)
        if PARALLEL_QUANT_WIDEN:
            quant.dequantize_rows_parallel(w.kind, w.data, w.data8, start, scratch[: stop - start])
        else:
            quant.dequantize_rows(w.kind, w.data, w.data8, np.arange(start, stop), scratch[: stop - start])
        out[:, start:stop] = x2 @ scratch[: stop - start].T
    return out


# prefill's products (more than GEMV_MAX_ROWS tokens, bf16 weights) over the threads as independent halves: the
# weight's rows split into one part per thread, each part widened and multiplied by ONE thread of a pool with
# OpenBLAS on one thread (True), instead of the whole weight widened on one thread and then multiplied by
# OpenBLAS's own threads (False). Why: OpenBLAS's threads meet at spin barriers inside every sgemm and spin ~0.1 s
# after it, so the numba kernels between two products (norms, RoPE, the decode rows' attention in a serving step)
# find a core taken, a thread descheduled by another process stalls its partner at the barrier, and the widening
# ran on one core while the other waited. Independent halves join once per product, and the widening is split too.
# The outputs move by float32 rounding only (OpenBLAS's results already depend on its thread count: one thread and
# two differ in the last bits; the same error against a float64 product). Measured on the 2-core AMD EPYC, a
# 256-token prefill of Qwen3-0.6B at load ~6: 8.2 s against 15.0 (best of 3, interleaved), CPU time 5.0 s
# against 9.7 (the spinning gone).
SPLIT_PREFILL_PRODUCTS = True


@cache
def _product_pool() -> ThreadPoolExecutor:  # the threads of SPLIT_PREFILL_PRODUCTS (as many as numba may use)
    return ThreadPoolExecutor(numba.config.NUMBA_NUM_THREADS, thread_name_prefix="tinyqwen-gemm")


def _split_parts(N: int) -> int:  # a prefill product's parts over the threads (1: not split)
    if not SPLIT_PREFILL_PRODUCTS:
        return 1
    return min(numba.get_num_threads(), max(1, N // 64))  # at most NUMBA_NUM_THREADS: the pool's size


def _widened_part(x2: np.ndarray, bits: np.ndarray, out: np.ndarray, lo: int, hi: int, budget: int) -> None:
    # out[:, lo:hi] = x2 @ widen(bits[lo:hi]).T, a block of at most `budget` bytes of float32 weight at a time
    K = bits.shape[1]
    block = max(1, min(hi - lo, budget // (4 * K)))
    scratch = np.empty((block, K), np.float32)
    for start in range(lo, hi, block):
        stop = min(hi, start + block)
        _widen(bits[start:stop], scratch[: stop - start])
        out[:, start:stop] = x2 @ scratch[: stop - start].T  # BLAS sgemm on the widened block


# prefill's bf16 products (more than GEMV_MAX_ROWS tokens) on prefill_gemm.py's panels and 12 x 32 micro-kernel
# where the CPU has AVX-512, instead of widened blocks into BLAS (NumPy's OpenBLAS may run only its AVX2 kernels:
# see prefill_gemm.py); q/k/v in one launch, the MLP in one. Figures: benchmarks/bench_prefill.py
PREFILL_PANELS = True


def _prefill_panelled(bits: tuple, *ks: int) -> bool:  # bf16 weights [N_i, K] that the panel kernels take
    return PREFILL_PANELS and prefill_gemm.usable(bits, *ks)


# "medium" prefill (bf16_inputs) where Numba's target has AVX512-BF16: prefill_gemm.py's panels on bf16 pairs and
# vdpbf16ps (half the panel bytes, 32 products per instruction); False: x rounded, then the float32 panels. A
# 128-256-token prefill of Qwen3-0.6B: see prefill_gemm.py (oneDNN, where present, keeps the products it takes)
PREFILL_DPBF16 = True


def _prefill_dpbf16(bits: tuple, *ks: int) -> bool:  # bf16 weights [N_i, K] that the vdpbf16ps panels take
    return PREFILL_DPBF16 and prefill_gemm.usable_bf16(bits, *ks)


def _widened_matmul(x2: np.ndarray, bits: np.ndarray) -> np.ndarray:  # [M, K] f32, [N, K] u16 -> [M, N] f32
    # prefill: compute-bound, so BLAS's sgemm on the weight widened to float32, a block of rows at a time (the
    # float32 copy never exceeds WIDEN_BLOCK_BYTES in all; one block, one sgemm call, for every matrix of Qwen3-0.6B
    # but the lm_head)
    if _prefill_panelled((bits,)):
        return prefill_gemm.matmul(x2, (bits,))[0]
    N, K = bits.shape
    out = np.empty((x2.shape[0], N), np.float32)
    parts = _split_parts(N)
    if parts < 2:
        _widened_part(x2, bits, out, 0, N, WIDEN_BLOCK_BYTES)
        return out
    size = -(-N // parts)
    bounds = [(lo, min(N, lo + size)) for lo in range(0, N, size)]
    with blas_threads(1):  # one OpenBLAS thread per part (no OpenBLAS found: its threads as they are)
        # list(): wait for every part, and re-raise the first error of any
        list(
            _product_pool().map(
                lambda b: _widened_part(x2, bits, out, *b, WIDEN_BLOCK_BYTES // parts), bounds
            )
        )
    return out


def linear(
    x: np.ndarray, w, bf16_inputs: bool = False, quant_gemv: str = "int8"
) -> np.ndarray:  # [..., d_in], [d_out, d_in] -> [..., d_out]
    if isinstance(w, QuantWeight):  # (bf16_inputs: no bf16 product here; "int8" rounds x further anyway)
        return _quant_linear(_rows(x), w, quant_gemv).reshape(*x.shape[:-1], w.shape[0])
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
    if bf16_inputs and _prefill_dpbf16((bits,)):  # "medium" on AVX512-BF16: vdpbf16ps on bf16 pairs
        return prefill_gemm.matmul_bf16(x2, (bits,))[0].reshape(*x.shape[:-1], N)
    if bf16_inputs:
        x2 = round_bf16(x2)[1]  # the same products as float32 numbers: bf16 x bf16 is exact in float32
    return _widened_matmul(x2, bits).reshape(*x.shape[:-1], N)


# prefill's q/k/v and gate/up/down with quantized weights on AVX-512 in one launch each (quant_panels.py):
# the products _quant_linear's panels take one weight at a time, the same bits; False: one launch per weight
QUANT_PANELS_MANY = True


def _quant_panels(x2: np.ndarray, ws: tuple, quant_gemv: str) -> bool:  # ws [n] take the fused panel launches
    return (
        QUANT_PANELS_MANY
        and QUANT_PREFILL_PANELS
        and x2.shape[0] > QUANT_GEMV_MAX_ROWS
        and all(
            isinstance(w, QuantWeight) and not (w.qtype in INT8_PREFILL and quant_gemv == "int8") for w in ws
        )
        and quant_panels.panels_usable(ws)
    )


def linears(x: np.ndarray, ws: tuple, bf16_inputs: bool = False, quant_gemv: str = "int8") -> tuple:
    # [..., d_in], n x [d_out_i, d_in] -> n x [..., d_out_i]: decode's q, k, v GEMVs in one kernel
    x2 = _rows(x)
    if x2.shape[0] <= QUANT_GEMV_MAX_ROWS and all(isinstance(w, QuantWeight) for w in ws):
        outs = quant.gemv(
            x2, tuple(ws), quant_gemv == "int8", _chunks(), _starts(tuple(w.shape[0] for w in ws))
        )
        return tuple(o.reshape(*x.shape[:-1], o.shape[1]) for o in outs)
    if (
        quant_gemv == "int8"
        and all(isinstance(w, QuantWeight) and w.qtype in INT8_PREFILL for w in ws)
        and QUANT_PREFILL_MANY
    ):  # prefill on the int8 tiles: x quantized once, every weight's rows in one parallel region
        outs = quant_matmul.matmul_many(x2, tuple(ws), _chunks())
        return tuple(o.reshape(*x.shape[:-1], o.shape[1]) for o in outs)
    if _quant_panels(x2, ws, quant_gemv):  # prefill on AVX-512: q, k, v in one launch of the panels
        outs = quant_panels.panel_matmul_many(x2, tuple(ws))
        return tuple(o.reshape(*x.shape[:-1], o.shape[1]) for o in outs)
    fused = all(isinstance(w, BF16Weight) and w.bits.flags.c_contiguous for w in ws)
    # one Numba type for all (a tuple indexed at run time): all read-only file maps, or all writable arrays
    fused = fused and len({w.bits.flags.writeable for w in ws}) == 1
    prefill = x2.shape[0] > GEMV_MAX_ROWS and not (bf16_inputs and onednn.available())  # (oneDNN: per weight)
    if prefill and fused and bf16_inputs and _prefill_dpbf16(tuple(w.bits for w in ws)):  # "medium"'s q, k, v
        outs = prefill_gemm.matmul_bf16(x2, tuple(w.bits for w in ws))
        return tuple(o.reshape(*x.shape[:-1], o.shape[1]) for o in outs)
    if prefill and fused and _prefill_panelled(tuple(w.bits for w in ws)):  # q, k, v: one launch, one split
        xs = round_bf16(x2)[1] if bf16_inputs else x2
        outs = prefill_gemm.matmul(xs, tuple(w.bits for w in ws))
        return tuple(o.reshape(*x.shape[:-1], o.shape[1]) for o in outs)
    if x2.shape[0] > GEMV_MAX_ROWS or not fused:
        return tuple(linear(x, w, bf16_inputs, quant_gemv) for w in ws)
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
    if _panelled(x2):  # a batched step of 12+ rows: widened blocks and the 6 x 16 micro-kernel
        bufs, accs = batch_gemm.scratch(x2.shape[1])
        xt = batch_gemm.panels(round_bf16(x2)[1] if bf16_inputs else x2)
        batch_gemm.panel_many(xt, x2.shape[0], bits, outs, starts, _panel_chunks(), bufs, accs)
        return outs
    if bf16_inputs and _tiled_dpbf16(x2, *bits):  # "medium" batched step on AVX512-BF16: vdpbf16ps tiles
        decode_tiles.gemm_dpbf16(round_bf16(x2)[0], bits, outs, starts, _chunks())
        return outs
    tiles = decode_tiles._gemm6_many_bf16 if decode_tiles.WIDE_TILES else decode_tiles._gemm_many_bf16
    kernel = tiles if _tiled(x2) else _gemv_many_bf16  # a batched step: the register tiles
    one_row = _one_row_pairs(x2, *bits)  # plain decode: one region iteration per thread
    kernel = _gemv1_many_bf16 if one_row else kernel
    kernel(round_bf16(x2)[1] if bf16_inputs else x2, bits, outs, starts, _workers() if one_row else _chunks())
    return outs


def swiglu(
    x: np.ndarray, w_gate, w_up, w_down, bf16_inputs: bool = False, quant_gemv: str = "int8"
) -> np.ndarray:  # [..., d], [f, d], [f, d], [d, f] -> [..., d]
    x2 = _rows(x)
    if (
        isinstance(w_gate, QuantWeight)
        and isinstance(w_up, QuantWeight)
        and x2.shape[0] <= QUANT_GEMV_MAX_ROWS
    ):
        if FUSED_QUANT_SWIGLU and quant_gemv == "int8" and isinstance(w_down, QuantWeight):  # one call
            return quant.swiglu_int(x2, w_gate, w_up, w_down, _chunks(), _starts((w_down.shape[0],))).reshape(
                x.shape
            )
        g, u = linears(x2, (w_gate, w_up), bf16_inputs, quant_gemv)  # one launch for both
        return linear(_silu_mul(g, u), w_down, bf16_inputs, quant_gemv).reshape(x.shape)
    if _quant_panels(x2, (w_gate, w_up, w_down), quant_gemv):  # prefill on AVX-512: the MLP in one launch
        return quant_panels.panel_swiglu(x2, w_gate, w_up, w_down).reshape(x.shape)
    bf16 = all(isinstance(w, BF16Weight) for w in (w_gate, w_up, w_down))
    if (
        FUSED_SWIGLU
        and bf16
        and not bf16_inputs
        and x2.shape[0] <= GEMV_MAX_ROWS
        and _panelled(x2, w_gate.shape[0])
    ):
        xt = batch_gemm.panels(x2)  # a batched step of 12+ rows, one call: see batch_gemm.py
        ht = np.empty((xt.shape[0], w_gate.shape[0], batch_gemm.PANEL), np.float32)
        out = np.empty(x2.shape, np.float32)
        (bufs, accs), (bufs_down, _) = batch_gemm.scratch(x2.shape[1]), batch_gemm.scratch(w_gate.shape[0])
        batch_gemm.panel_swiglu(xt, x2.shape[0], w_gate.bits, w_up.bits, w_down.bits, ht, out,
                                _starts((w_down.shape[0],)), _panel_chunks(), bufs, bufs_down, accs)  # fmt: skip
        return out.reshape(x.shape)
    if FUSED_SWIGLU and bf16 and not bf16_inputs and x2.shape[0] <= GEMV_MAX_ROWS:  # decode, one call
        h = np.empty((x2.shape[0], w_gate.shape[0]), np.float32)
        out = np.empty(x2.shape, np.float32)
        tiles = decode_tiles._swiglu6_gemm_bf16 if decode_tiles.WIDE_TILES else decode_tiles._swiglu_gemm_bf16
        kernel = tiles if _tiled(x2) else _swiglu_bf16  # a batched step: the register tiles
        one_row = _one_row_pairs(x2, w_gate.bits, w_up.bits, w_down.bits)  # plain decode
        kernel = _swiglu1_bf16 if one_row else kernel
        kernel(x2, w_gate.bits, w_up.bits, w_down.bits, h, out, _starts((w_down.shape[0],)),
               _workers() if one_row else _chunks())  # fmt: skip
        return out.reshape(x.shape)
    medium_prefill = bf16 and bf16_inputs and x2.shape[0] > GEMV_MAX_ROWS and not onednn.available()
    if (
        medium_prefill
        and _prefill_dpbf16((w_down.bits,))
        and _prefill_dpbf16((w_gate.bits, w_up.bits), w_gate.shape[0])
    ):
        # "medium"'s MLP in one launch on AVX512-BF16: h = SiLU(g)·u rounded to bf16 into the pairs down reads
        return prefill_gemm.swiglu_bf16(x2, w_gate.bits, w_up.bits, w_down.bits).reshape(x.shape)
    if (bf16 and not bf16_inputs and x2.shape[0] > GEMV_MAX_ROWS and _prefill_panelled((w_down.bits,))
            and _prefill_panelled((w_gate.bits, w_up.bits), w_gate.shape[0])):  # fmt: skip
        # prefill's MLP in one launch: gate/up with SiLU·mul into the panels down reads
        return prefill_gemm.swiglu(x2, w_gate.bits, w_up.bits, w_down.bits).reshape(x.shape)
    if (
        bf16
        and bf16_inputs
        and x2.shape[0] <= GEMV_MAX_ROWS
        and not _panelled(x2)
        and _tiled_dpbf16(x2, w_gate.bits, w_up.bits, w_down.bits)
    ):  # "medium" batched step on AVX512-BF16: gate/up, h rounded to bf16, down, in one call of vdpbf16ps tiles
        out = decode_tiles.swiglu_dpbf16(round_bf16(x2)[0], w_gate.bits, w_up.bits, w_down.bits,
                                         _starts((w_down.shape[0],)), _chunks())  # fmt: skip
        return out.reshape(x.shape)
    if isinstance(w_gate, BF16Weight) and isinstance(w_up, BF16Weight) and x2.shape[0] <= GEMV_MAX_ROWS:
        if _panelled(x2):
            xt = batch_gemm.panels(round_bf16(x2)[1] if bf16_inputs else x2)
            ht = np.empty((xt.shape[0], w_gate.shape[0], batch_gemm.PANEL), np.float32)
            bufs, accs = batch_gemm.scratch(x2.shape[1])
            batch_gemm.panel_gate_up(xt, w_gate.bits, w_up.bits, ht, _panel_chunks(), bufs, accs)
            return linear(batch_gemm.unpanel(ht, x2.shape[0]), w_down, bf16_inputs, quant_gemv).reshape(
                x.shape
            )
        h = np.empty((x2.shape[0], w_gate.shape[0]), np.float32)
        tiles = (
            decode_tiles._gate_up6_gemm_bf16 if decode_tiles.WIDE_TILES else decode_tiles._gate_up_gemm_bf16
        )
        kernel = tiles if _tiled(x2) else _gate_up_bf16
        kernel(round_bf16(x2)[1] if bf16_inputs else x2, w_gate.bits, w_up.bits, h, _chunks())
    else:
        h = _silu_mul(*linears(x2, (w_gate, w_up), bf16_inputs, quant_gemv))  # (quantized: one region)
    return linear(h, w_down, bf16_inputs, quant_gemv).reshape(x.shape)
