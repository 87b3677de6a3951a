"""Plain decode's bf16 GEMVs (one token row, K even): the weights read as uint32 pairs of bf16, in one parallel region.

A row's dot product as two sums, one over its even positions and one over its odd ones: one 32-bit load brings
two weights (intrinsics._bf16_lo, _bf16_hi: a shift, an AND), and x, split once per product into its even and
odd values, lines up with them. On the AMD EPYC (AVX2) host, one thread, CPU time (a busy machine, interleaved,
best of 6-8): 144 MB of [3072, 1024] weights streamed at 14.5-15.1 GB/s against 13.4-14.3 for linear.py's
one-weight-at-a-time loop, the lm_head [151936, 1024] at 11.5 against 10.9, and a [2048, 1024] weight in cache at
32-34 against 21 GB/s. The sums' order differs from that loop's (float32 rounding: within 2e-7 of the largest
output here), so these are the only one-row bf16 kernels: the fused decode layer (decode_layer.py) and the
kernel-by-kernel path (linear.py) both use them and stay equal to each other bit for bit.

The threads claim chunks of rows as they go (phases.py) instead of taking fixed blocks: a thread that another
process holds up leaves its rows to the other (the lm_head, 311 MB, is a quarter of a 0.6B step's bytes).

Where the AMD EPYC host's bf16 step lost to llama.cpp (0.87-0.89x on a quiet machine, at 85 % of the measured read
bandwidth against its 97 %), measured on the busy 2-core machine (load average 6-8, same process, interleaved,
best of 8-80): the GEMVs alone over the step's 1192 MB (three launches, no attention, norms or barriers) took 0.89
of the whole step's time, so about a tenth of the step is the rest (attention, norms, RoPE, the waits at 252
phase ends, Python around the call); and the GEMVs themselves ran slower with the next-row prefetch than without
(ROW_PREFETCH below: 1.08x the time on 1 thread, 1.24x on 2, over the GGUF's own 2 KiB-row matrices and lm_head),
so Zen 3 skips it (Zen 5 keeps it: faster there). The loop LLVM emits (inspect_asm) is 2 loads, 2 shifts, 2
blends, 4 multiplies with x from memory and 4 adds per 64 bytes of weights, 4 independent sums (no FMA: only
reassociation is allowed):
far below what one core can issue, so the row dot waits on memory, not on arithmetic. Tried and not taken: two
rows per pass sharing x's loads (1.10-1.17x the time), a prefetch per 64-byte block inside the row (~2x: LLVM no
longer vectorises the loop well), prefetching 2-8 KiB ahead instead of the next row (0.9-1.1x, noise); huge
pages for the weights: the file's mapping takes MADV_HUGEPAGE but stays in 4 KiB pages (ext4 page cache, and
MADV_COLLAPSE is refused). The same weights copied into NumPy's anonymous (huge-page) memory streamed no faster
on 2 threads (same process, interleaved), 1.2x faster on 1 thread (separate runs); not taken: the copy is a
second copy of the weights beside the file's pages.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from tinyqwen.backends.numba.intrinsics import FAST, _bf16_hi, _bf16_lo, _prefetch_weight_row, _silu
from tinyqwen.backends.numba.phases import LINE, claim, finish, wait_finished
from tinyqwen.backends.numba.settings import host_cpu_name


# Whether these kernels ask for the next weight row (2 KiB) while they sum the current one (intrinsics.py's
# _prefetch_weight_row). It paid on Sapphire Rapids (the GEMVs of a decode step 47.4 -> 44.8 ms) and costs on AMD
# Zen 3, whose own prefetchers keep up with a row that follows the one before: the Qwen3-0.6B bf16 GGUF's lm_head
# (311 MB, file-mapped) streamed at 10.3 GB/s of CPU time without against 9.0 with it (1 thread; 8.8 vs 7.3 and
# 10.2 vs 8.5 in two more runs), its 140 layer matrices of 2 KiB rows at 11.3 vs 8.4, and those plus the lm_head
# (898 MB) on 2 threads took 0.93-0.96 of the time (a busy 2-core machine, load average 6-7, same process,
# interleaved, best of 30-80; benchmarks/bench_decode_step.py prefetch: 1.08-1.15x the time with it on 1 thread,
# 1.24-1.28x on 2). Zen 5 is the other way again: with the prefetch 0.81x the time on 1 thread (21.9 -> 26.9
# GB/s), 0.93x on 2 (the same benchmark, 141 matrices of 2 KiB rows, 898 MB; load 3.3, interleaved, best of 10).
# Zen 4 follows Zen 5, unmeasured. A constant per CPU model: Numba keys its saved kernels by the CPU's name too, so
# a cache never holds the other choice.
def row_prefetch(cpu_name: str) -> bool:
    """Whether the one-row GEMVs prefetch the next weight row on this LLVM CPU name: not on Zen 1-3.

    >>> row_prefetch("sapphirerapids"), row_prefetch("znver3"), row_prefetch("znver5")
    (True, False, True)
    """
    return cpu_name not in ("znver1", "znver2", "znver3")


ROW_PREFETCH = row_prefetch(host_cpu_name())


@njit(cache=True, inline="always")
def _prefetch_next(a):  # a weight row about to be summed, where ROW_PREFETCH says it pays
    if ROW_PREFETCH:
        _prefetch_weight_row(a)


@njit(cache=True, fastmath=FAST, error_model="numpy", inline="always")
def _dot_pairs(
    xe, xo, row
):  # x's even and odd values [K/2] x2, a weight row as uint32 pairs [K/2] -> float32
    ae = np.float32(0.0)
    ao = np.float32(0.0)
    for j in range(row.shape[0]):
        u = row[j]
        ae += xe[j] * _bf16_lo(u)
        ao += xo[j] * _bf16_hi(u)
    return ae + ao


@njit(cache=True)
def _split_part(
    x, xe, xo, lo, hi
):  # positions lo..hi of x [1, K] f32 into xe or xo [K/2] (even, odd position)
    for f in range(lo, hi):
        if f % 2 == 0:
            xe[f >> 1] = x[0, f]
        else:
            xo[f >> 1] = x[0, f]


@njit(cache=True)
def _split_pairs(x, xe, xo):  # [1, K] f32 -> xe, xo [K/2]: x's even and odd positions (written)
    _split_part(x, xe, xo, 0, x.shape[1])


@njit(cache=True, fastmath=FAST, error_model="numpy")
def _gemv1_rows_bf16(xe, xo, ws, outs, starts, lo, hi):  # _gemv_rows_bf16 for one row (x split), K even
    # each weight viewed as uint32 once (a view per row, the same bytes, ran at 21 GB/s in cache against 34:
    # LLVM no longer vectorised the loop over it as well)
    for i in range(len(ws)):
        r0, r1 = max(lo, starts[i]), min(hi, starts[i + 1])
        if r0 >= r1:
            continue
        w2, out = ws[i].view(np.uint32), outs[i]
        for n in range(r0 - starts[i], r1 - starts[i]):
            if n + 1 < r1 - starts[i]:
                _prefetch_next(w2[n + 1])
            out[0, n] = _dot_pairs(xe, xo, w2[n])


@njit(cache=True, fastmath=FAST, error_model="numpy")
def _gate_up1_rows_bf16(
    xe, xo, w_gate, w_up, out, lo, hi
):  # _gate_up_rows_bf16 for one row (x split), K even
    g2, u2 = w_gate.view(np.uint32), w_up.view(np.uint32)
    for f in range(lo, hi):
        if f + 1 < hi:
            _prefetch_next(g2[f + 1])
            _prefetch_next(u2[f + 1])
        out[0, f] = _silu(_dot_pairs(xe, xo, g2[f])) * _dot_pairs(xe, xo, u2[f])


@njit(cache=True)
def _claim_size(total, row_bytes, workers):  # rows per claimed chunk: ~128 KiB, at most ~64 chunks per worker
    return max(1, (128 << 10) // row_bytes, (total + 64 * workers - 1) // (64 * workers))


@njit(cache=True)
def _gemv1_claimed(xe, xo, ws, outs, starts, size, ctr, p):  # one worker: claim chunks of phase p until none
    total = starts[-1]
    while True:
        lo = claim(ctr, p) * size
        if lo >= total:
            break
        _gemv1_rows_bf16(xe, xo, ws, outs, starts, lo, min(total, lo + size))
        finish(ctr, p)


@njit(parallel=True, cache=True, nogil=True)
def _gemv1_many_bf16(
    x, ws, outs, starts, workers
):  # _gemv_many_bf16 for one row [1, K], K even, 1 per thread
    # the threads claim chunks as they go (phases.py) instead of fixed blocks: a thread that another process
    # holds up leaves its rows to the other (the lm_head, 311 MB, is a quarter of a 0.6B step's bytes)
    K = x.shape[1]
    xe = np.empty(K // 2, np.float32)
    xo = np.empty(K // 2, np.float32)
    _split_pairs(x, xe, xo)
    size = _claim_size(starts[-1], 2 * K, workers)
    ctr = np.zeros(2 * LINE, np.int64)
    for _ in prange(workers):
        _gemv1_claimed(xe, xo, ws, outs, starts, size, ctr, 0)


@njit(cache=True)
def _swiglu1_phases(xe, xo, w_gate, w_up, w_down, h, he, ho, out, starts, size1, size2, ctr):
    # one worker's run through _swiglu1_bf16's two phases: gate/up rows (h, and h split), then down rows
    F = w_gate.shape[0]
    while True:
        lo = claim(ctr, 0) * size1
        if lo >= F:
            break
        hi = min(F, lo + size1)
        _gate_up1_rows_bf16(xe, xo, w_gate, w_up, h, lo, hi)
        _split_part(h, he, ho, lo, hi)
        finish(ctr, 0)
    wait_finished(ctr, 0, (F + size1 - 1) // size1)
    _gemv1_claimed(he, ho, (w_down,), (out,), starts, size2, ctr, 1)


@njit(parallel=True, cache=True, nogil=True)
def _swiglu1_bf16(x, w_gate, w_up, w_down, h, out, starts, workers):  # _swiglu_bf16, one row, K and F even
    # in one parallel region: the threads claim gate/up chunks, meet when all are done, then claim down's
    K, F = x.shape[1], w_gate.shape[0]
    xe = np.empty(K // 2, np.float32)
    xo = np.empty(K // 2, np.float32)
    _split_pairs(x, xe, xo)
    he = np.empty(F // 2, np.float32)
    ho = np.empty(F // 2, np.float32)
    size1 = _claim_size(F, 4 * K, workers)
    size2 = _claim_size(w_down.shape[0], 2 * F, workers)
    ctr = np.zeros(4 * LINE, np.int64)
    for _ in prange(workers):
        _swiglu1_phases(xe, xo, w_gate, w_up, w_down, h, he, ho, out, starts, size1, size2, ctr)


def _one_row_pairs(x2: np.ndarray, *bits) -> bool:  # the uint32-pair kernels apply: one row, every K even
    return x2.shape[0] == 1 and all(b.shape[-1] % 2 == 0 and b.flags.c_contiguous for b in bits)
