"""The mixture-of-experts block: only the routed experts run — decode in one fused kernel over every (token,
expert) pair, prefill grouped by expert (each expert's weights read once per call). Quantized experts stay stacked
per layer in their blocks ([E, rows, bytes], `QuantWeight`) and decode through `quant.moe_up` / `quant.moe_down`.
Quantized prefill's experts take the int8 tiles, and on AVX-512 an expert's whole panels of 32 tokens (and a
remainder of PANEL_MIN_TOKENS or more) prefill_gemm.py's float32 panels (`_experts_mixed`).
"""

from __future__ import annotations

import numba
import numpy as np
from numba import njit, prange

from tinyqwen.backends.numba import phases, prefill_gemm, quant, quant_matmul, quant_panels
from tinyqwen.backends.numba.intrinsics import FAST, _bf16, _prefetch_weight_row, _silu, _to_bf16, round_bf16
from tinyqwen.backends.numba.linear import (
    GEMV_MAX_ROWS,
    QUANT_GEMV_MAX_ROWS,
    _chunks,
    _rows,
    _workers,
    linear,
    swiglu,
)
from tinyqwen.backends.numba.prefill_gemm import NR, PANEL, _mk12x32
from tinyqwen.backends.numba.quant_matmul import TILE, TILE8, _five, _tile, _tile8
from tinyqwen.backends.numba.weights import BF16Weight, QuantWeight
from tinyqwen.blas_threads import blas_threads
from tinyqwen.moe import route


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


@njit(parallel=True, cache=True, nogil=True)
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


def _expert(w, e: int):  # one expert's [rows, cols] weight out of the stacked [E, rows, cols]
    return BF16Weight(w.bits[e]) if isinstance(w, BF16Weight) else w[e]


# "int8" MoE on the dense GEMV's row dots (quant.moe_*_int: whole expert stacks and row numbers, eight float lanes
# across a row); False: the block dots on row views (quant.moe_up / moe_down / the grouped pair), as before
MOE_ROW_DOTS = True


def _flat(
    w,
) -> tuple:  # a stacked [E, N, bytes] QuantWeight's bytes as one [E·N, bytes] matrix (views, no copy)
    return w.data.reshape(-1, w.data.shape[-1]), w.data8.reshape(-1, w.data.shape[-1])


# A decode step's (token, expert) pairs as whole jobs of one parallel launch (`_moe_pairs_int`), when there are at
# least as many pairs as threads (top-8 routing: a single token on up to 8 threads); otherwise, or False, the two
# launches below (every pair's gate/up rows over the threads, then every pair's down rows)
MOE_PAIR_JOBS = True


@njit(parallel=True, cache=True, nogil=True, error_model="numpy")
def _moe_pairs_int(kg, ku, kd, g, g8, u, u8, dw, dw8, acts, experts, need0, needk, h, hacts, y):
    # acts: x's int8 forms; g/u [E·F, bytes], dw [E·d, bytes] (whole stacks, row numbers e·F + f) -> h [N·k, F]
    # (its int8 forms in hacts), y [N·k, d]: each pair's expert output before its routing weight.
    # One job per pair, all of it on one thread: its expert's gate and up rows -> h[p] -> h[p] quantized -> its
    # expert's down rows. A pair's down product needs only its own h row, so no pair waits for another: one launch
    # (one wake-up of the threads) instead of two plus the quantization between them, and each thread streams one
    # expert's three matrices front to back. The same row dots and row quantizers as moe_up_int / activations /
    # moe_down_int, on the same values: the same bits.
    N, k = experts.shape
    F, d = h.shape[1], y.shape[1]
    ha0q, ha0d, hakq, hakd, haks = hacts
    for p in prange(N * k):
        t, e = p // k, experts[p // k, p % k]
        acc = np.empty(8, np.float32)  # (the plain loops' lanes)
        for f in range(F):
            r = e * F + f
            h[p, f] = _silu(quant._row(kg, g, g8, r, acts, t, acc)) * quant._row(ku, u, u8, r, acts, t, acc)
        if need0:
            quant.quantize_q8_0_rows(h[p : p + 1], ha0q[p : p + 1], ha0d[p : p + 1])
        if needk:
            quant.quantize_q8_k_rows(h[p : p + 1], hakq[p : p + 1], hakd[p : p + 1], haks[p : p + 1])
        for i in range(d):
            y[p, i] = quant._row(kd, dw, dw8, e * d + i, hacts, p, acc)


def _moe_decode_quant(x, experts, weights, w_gate, w_up, w_down, use_int: bool) -> np.ndarray:
    # x [N, d] f32, routing [N, k], stacked quantized experts -> [N, d]: two launches for all (token, expert) pairs
    x2 = _rows(x)
    N, k = experts.shape
    h = np.empty((N * k, w_gate.shape[1]), np.float32)
    if use_int and MOE_ROW_DOTS and MOE_PAIR_JOBS and N * k >= numba.get_num_threads():  # one launch
        acts = quant.activations(x2, {w_gate.kind, w_up.kind}, True)[1:6]
        need0, needk = quant._needs({w_down.kind})
        F = h.shape[1]
        hacts = (
            np.empty((N * k, F if need0 else 0), np.int8),
            np.empty((N * k, F // 32 if need0 else 0), np.float32),
            np.empty((N * k, F if needk else 0), np.int8),
            np.empty((N * k, F // 256 if needk else 0), np.float32),
            np.empty((N * k, F // 32 if needk else 0), np.int32),
        )  # (as quant.activations' placeholders: a form the down weights do not read is empty)
        y = np.empty((N * k, x2.shape[1]), np.float32)
        _moe_pairs_int(
            w_gate.kind, w_up.kind, w_down.kind, *_flat(w_gate), *_flat(w_up), *_flat(w_down), acts, experts,
            need0, needk, h, hacts, y,
        )  # fmt: skip
        out = np.empty(x2.shape, np.float32)
        quant.moe_combine(y, weights.astype(np.float32), out)
        return out
    if use_int and MOE_ROW_DOTS:  # the row dots; each pair's output, then the tokens' sums as prefill's
        acts = quant.activations(x2, {w_gate.kind, w_up.kind}, True)[1:6]
        quant.moe_up_int(w_gate.kind, w_up.kind, *_flat(w_gate), *_flat(w_up), acts, experts, h, _chunks())
        y = np.empty((N * k, x2.shape[1]), np.float32)
        acts = quant.activations(h, {w_down.kind}, True)[1:6]
        quant.moe_down_int(w_down.kind, *_flat(w_down), acts, experts, y, _chunks())
        out = np.empty(x2.shape, np.float32)
        quant.moe_combine(y, weights.astype(np.float32), out)
        return out
    acts = quant.activations(x2, {w_gate.kind, w_up.kind}, use_int)
    quant.moe_up(
        use_int, w_gate.kind, w_up.kind, w_gate.data, w_gate.data8, w_up.data, w_up.data8, acts, experts, h,
        _chunks(),
    )  # fmt: skip
    out = np.empty(x2.shape, np.float32)
    acts = quant.activations(h, {w_down.kind}, use_int)
    quant.moe_down(
        use_int,
        w_down.kind,
        w_down.data,
        w_down.data8,
        acts,
        experts,
        weights.astype(np.float32),
        out,
        _chunks(),
    )
    return out


# From how many tokens an expert's blocks are widened into BLAS instead of dotted with each token in turn. One
# thread, a 2-layer Qwen3-30B-A3B Q4_K_M (benchmarks/bench_moe.py's file), per expert: 8 tokens took 8.2 ms as int8
# dots, 30 ms as float dots, 23.5 ms widened into sgemm (the widening is most of it); 32 tokens 27, 134 and 36 ms.
# But in a whole 2-thread prefill the widening runs on one thread between parallel launches (BLAS's threads spin
# meanwhile): a 128-token prompt, whose random routing gave some experts 48+ tokens, took 6.2-7.9 s with those
# experts in BLAS and 4.2-5.4 s with every expert on the int8 dots (same process, interleaved, a busy machine). So
# "int8" stays on its dots (512: only a long prompt's chunk reaches it; not measured), "float" widens into BLAS
# from 4 tokens, as the dense prefill does (its dots are slower than BLAS at any count).
BLAS_MIN_TOKENS = {"int8": 512, "float": 4}


# prefill's "int8" experts in quant_matmul's tiles (four of an expert's tokens per decoded row; the same bits as the
# row dots); False: quant.moe_up_grouped_int / moe_down_grouped_int, one token per row dot
MOE_PREFILL_TILES = True
# an expert's last 2 or 3 tile tokens padded to a tile of 4 with zero rows (their products are 0, never read): a
# tile of 4 costs ~1.6 row dots, and a prompt's experts get ~8 tokens each, so a fifth of the pairs would otherwise
# take the row dots (4: never)
MOE_TILE_PAD_FROM = 2


# ---- MoE prefill: each routed expert's rows · the tokens that chose it, in tiles --------------------------------
# The (token, expert) pairs sorted by expert and the activations gathered in that order (x's row of each pair's
# token; SwiGLU's h row of each pair), so an expert's tokens are consecutive rows and tile as a dense prompt does.
# Each row dot is the one quant.py's grouped MoE kernels take, on the same quantized rows: the same bits.


@njit(cache=True, error_model="numpy")
def _expert_up_rows(kg, ku, g, g8, u, u8, F, acts, e, b0, b1, h, lo, hi):  # rows lo..hi of expert e
    # gate/up [E·F, bytes]; acts: rows b0..b1 are e's tokens -> h[b0:b1, lo:hi] = silu(x·g)·(x·u)
    acc = np.empty(8, np.float32)
    for f in range(lo, hi):
        r = e * F + f
        m = b0
        if kg != quant.Q8_0 and ku != quant.Q8_0 and TILE8:
            while m + 2 * TILE <= b1:
                gv8 = _tile8(kg, g, g8, r, acts, m, acc)
                uv8 = _tile8(ku, u, u8, r, acts, m, acc)
                for t in range(2 * TILE):
                    h[m + t, f] = _silu(gv8[t]) * uv8[t]
                m += 2 * TILE
        while m + TILE <= b1:
            gv = _tile(kg, g, g8, r, acts, m, acc)
            uv = _tile(ku, u, u8, r, acts, m, acc)
            for t in range(TILE):
                h[m + t, f] = _silu(gv[t]) * uv[t]
            m += TILE
        while m < b1:
            h[m, f] = _silu(quant._row(kg, g, g8, r, _five(acts), m, acc)) * quant._row(
                ku, u, u8, r, _five(acts), m, acc
            )
            m += 1


@njit(cache=True, error_model="numpy")
def _expert_down_rows(kd, w, w8, d, acts, e, b0, b1, y, lo, hi):  # output features lo..hi of expert e
    acc = np.empty(8, np.float32)
    for i in range(lo, hi):
        r = e * d + i
        m = b0
        if kd != quant.Q8_0 and TILE8:
            while m + 2 * TILE <= b1:
                v8 = _tile8(kd, w, w8, r, acts, m, acc)
                for t in range(2 * TILE):
                    y[m + t, i] = v8[t]
                m += 2 * TILE
        while m + TILE <= b1:
            y[m, i], y[m + 1, i], y[m + 2, i], y[m + 3, i] = _tile(kd, w, w8, r, acts, m, acc)
            m += TILE
        while m < b1:
            y[m, i] = quant._row(kd, w, w8, r, _five(acts), m, acc)
            m += 1


# Work items of expert_up_mixed / expert_down_mixed per thread, on average: an expert is cut into pieces of at most about
# 1 / (JOBS_PER_THREAD · threads) of the whole, so that claiming them costliest first leaves little tail
JOBS_PER_THREAD = 8


# ---- MoE prefill on prefill_gemm.py's panels: an expert with enough tokens -------------------------------------
# Its tokens packed into their own panels of 32 (xt [Q, d, 32], expert j's panels pstart[j]..pstart[j + 1], the rows
# past its count zeros), a block of its rows dequantized into a float32 buffer, the 12 x 32 micro-kernel over its
# panels: float32 products of the exact weights and x (the dense Q4_K_M prefill's road), where the tiles take x and
# h as 8-bit blocks. gate/up write SiLU(g)·u straight into the hidden panels hp [Q, F, 32] the down rows read.


@njit(cache=True, error_model="numpy")
def _expert_down_panels(kd, w, w8, d, hp, e, p0, p1, c, y, b0, lo, hi, R):
    # output features lo..hi of expert e's down ([E·d, bytes]) over its hidden panels p0..p1 (its c tokens) ->
    # y[b0:b0 + c, lo:hi]; blocks of R rows (the buffer allocated here: see quant_panels.gate_up_panels)
    buf = np.empty((R, hp.shape[1]), np.float32)
    acc = np.empty((NR, PANEL), np.float32)
    for s in range(lo, hi, R):
        n = min(hi, s + R) - s
        prefill_gemm.dequantize_rows(kd, w, w8, e * d + s, buf[:n])
        for p in range(p0, p1):
            m0 = (p - p0) * PANEL
            m1 = min(c, m0 + PANEL)
            for r in range(0, n, NR):
                _mk12x32(hp, p, buf, r, acc)
                T = min(NR, n - r)
                for m in range(m0, m1):
                    for t in range(T):
                        y[b0 + m, s + r + t] = acc[t, m - m0]


@njit(parallel=True, cache=True, nogil=True)
def expert_up_mixed(kg, ku, g, g8, u, u8, acts, xt, groups, bounds, pstart, jobs, workers, h, hp, R):
    # jobs [J, 4] (road: 0 tiles, 1 panels; expert j; rows lo..hi), costliest first. Tiles: acts of the gathered
    # x, expert j's rows bounds[j]..bounds[j + 1] -> h. Panels: xt's panels pstart[j]..pstart[j + 1] -> hp.
    # Both roads in one launch, the jobs claimed in turn (phases.claim): see mixed_jobs
    F = h.shape[1]
    ctr = np.zeros(2 * phases.LINE, np.int64)  # (phases.counters(1))
    for _ in prange(workers):
        i = phases.claim(ctr, 0)
        while i < jobs.shape[0]:
            j, lo, hi = jobs[i, 1], jobs[i, 2], jobs[i, 3]
            if jobs[i, 0] == 0:
                _expert_up_rows(kg, ku, g, g8, u, u8, F, acts, groups[j], bounds[j], bounds[j + 1], h, lo, hi)
            else:
                quant_panels.gate_up_panels(
                    kg, ku, g, g8, u, u8, groups[j] * F, xt, pstart[j], pstart[j + 1], hp, lo, hi, R
                )  # fmt: skip
            i = phases.claim(ctr, 0)


@njit(parallel=True, cache=True, nogil=True)
def expert_down_mixed(kd, w, w8, acts, hp, groups, bounds, pstart, ybase, counts, jobs, workers, y, yp, R):
    # jobs as expert_up_mixed's, over output features. Tiles: acts of the gathered h -> y rows bounds[j]..;
    # panels: hp's panels of expert j -> yp rows ybase[j]..ybase[j] + counts[j]
    d = y.shape[1]
    ctr = np.zeros(2 * phases.LINE, np.int64)  # (phases.counters(1))
    for _ in prange(workers):
        i = phases.claim(ctr, 0)
        while i < jobs.shape[0]:
            j, lo, hi = jobs[i, 1], jobs[i, 2], jobs[i, 3]
            if jobs[i, 0] == 0:
                _expert_down_rows(kd, w, w8, d, acts, groups[j], bounds[j], bounds[j + 1], y, lo, hi)
            else:
                _expert_down_panels(
                    kd, w, w8, d, hp, groups[j], pstart[j], pstart[j + 1], counts[j], yp, ybase[j], lo, hi, R
                )  # fmt: skip
            i = phases.claim(ctr, 0)


# From how many tokens an expert's remainder past whole panels of 32 takes a panel of its own instead of the tiles
# (gate/up's format decides: the down rows read the hidden panels gate/up wrote). One expert of the 2-layer
# Qwen3-30B-A3B shapes (gate/up [768, 2048], down [2048, 768]), one thread, CPU ms, tiles against one panel:
# Q4_K 16 tokens 1.14 / 1.70, 24 1.83 / 1.79, 32 2.34 / 1.88; Q4_K with Q6_K down 24 1.90 / 1.71, 32 2.51 / 1.79;
# Q8_0 16 2.07 / 2.54, 24 3.03 / 2.60. (A panel costs the same for 1 token or 32: the micro-kernel is 12 x 32.)
PANEL_MIN_TOKENS = {quant.Q4_K: 24, quant.Q6_K: 24, quant.Q8_0: 20}
MOE_PREFILL_PANELS = True  # False: every expert on the tiles
# a part's cost per weight row, in tile token-rows: tiles its padded tokens; panels PANEL_ROW_COST[0] (the blocks'
# dequantization) + PANEL_ROW_COST[1] per panel (from the figures above: Q4_K 0.07 ms per token on the tiles, a
# panel ~1.5 ms and its dequantization ~0.35)
PANEL_ROW_COST = (5.0, 21.0)


def mixed_jobs(cost: np.ndarray, road: np.ndarray, expert: np.ndarray, rows: int, threads: int) -> np.ndarray:
    """The work items of one projection: parts [n] of the routed experts, each with its cost per weight row, its
    road (0 tiles, 1 panels) and its expert (index into groups); rows per expert -> jobs [J, 4] int64 (road,
    expert, rows lo..hi), costliest first; a panel part's pieces a multiple of NR rows (the micro-kernel's).

    A prompt's routing gives experts 1-86 tokens (the 2-layer Qwen3-30B-A3B-shaped file, 128 tokens, top-8):
    prange's fixed halves of the experts, each expert one item, left one thread with most of the work. Here an
    expert is cut into pieces of about equal cost, and the threads take them in turn, costliest first."""
    cost = np.asarray(cost, np.float64)
    target = max(1e-9, float(cost.sum()) * rows / (JOBS_PER_THREAD * max(1, threads)))
    pieces = np.clip(np.ceil(cost * rows / target).astype(np.int64), 1, rows)
    size = -(-rows // pieces)
    size = np.where(road == 1, np.minimum(rows, -(-size // NR) * NR), size)
    n = -(-rows // size)
    j = np.repeat(np.arange(len(cost)), n)
    lo = (np.arange(n.sum()) - np.repeat(np.cumsum(n) - n, n)) * np.repeat(size, n)
    hi = np.minimum(rows, lo + np.repeat(size, n))
    order = np.argsort(-(hi - lo) * cost[j], kind="stable")
    return np.stack((road[j], expert[j], lo, hi), axis=1)[order].astype(np.int64)


def _panel_split(counts: np.ndarray, threshold: int) -> tuple:
    # counts [G] -> (panels [G], tokens left to the tiles [G]): whole panels of 32, and one more for a remainder
    # of `threshold` or more tokens (0: no panels)
    if threshold <= 0:
        return np.zeros_like(counts), counts
    q, rem = counts // PANEL, counts % PANEL
    up = rem >= threshold
    return q + up, np.where(up, 0, rem)


def _ranges(
    starts: np.ndarray, lengths: np.ndarray
) -> np.ndarray:  # concatenated aranges start..start + length
    lengths = np.asarray(lengths, np.int64)
    return np.repeat(np.asarray(starts, np.int64) - np.cumsum(lengths) + lengths, lengths) + np.arange(
        lengths.sum()
    )


def _quantized(x, kinds: set, chunks: int) -> tuple:  # quantize_acts, or its empty arrays for no rows
    needs = quant._needs(kinds)
    if x.shape[0] == 0:
        return quant_matmul._acts(0, x.shape[1], *needs)
    return quant_matmul.quantize_acts(x, *needs, chunks)


def _experts_mixed(x2, tokens, w_gate, w_up, w_down, groups, counts) -> np.ndarray:
    # x2 [N, d]; tokens [P]: each pair's token, the pairs sorted by expert (groups [G], counts [G] pairs each) ->
    # each pair's expert output [P, d], unweighted. Each expert's first 32·q tokens take q panels and the rest
    # the tiles (padded, MOE_TILE_PAD_FROM); q = ceil(count / 32) when the remainder past whole panels has
    # PANEL_MIN_TOKENS or more, else floor (_panel_split)
    N, d = x2.shape
    F = w_gate.shape[1]
    G = len(counts)
    counts = np.asarray(counts, np.int64)
    npan, tc = _panel_split(counts, PANEL_MIN_TOKENS[w_gate.kind] if MOE_PREFILL_PANELS else 0)
    pc = counts - tc  # tokens in panels
    pad = np.where(tc % 4 >= MOE_TILE_PAD_FROM, -tc % 4, 0)
    bounds = np.concatenate(([0], np.cumsum(tc + pad))).astype(np.int64)
    pstart = np.concatenate(([0], np.cumsum(npan))).astype(np.int64)
    ybase = np.concatenate(([0], np.cumsum(pc))).astype(np.int64)
    cb = np.concatenate(([0], np.cumsum(counts))).astype(np.int64)
    pan_src = _ranges(cb[:-1], pc)  # pair positions of the panel tokens (each expert's first pc)
    pan_dst = _ranges(pstart[:-1] * PANEL, pc)  # their rows of the panels
    tile_src = _ranges(cb[:-1] + pc, tc)  # the rest
    tile_dst = _ranges(bounds[:-1], tc)  # their rows of the gathered x (the padding rows: row N, zeros)
    xz = np.concatenate((x2, np.zeros((1, d), np.float32)))
    rows = np.full(bounds[-1], N, np.int64)
    rows[tile_dst] = tokens[tile_src]
    xs = xz[rows]
    prow = np.full(pstart[-1] * PANEL, N, np.int64)
    prow[pan_dst] = tokens[pan_src]
    xt = prefill_gemm.panels(xz[prow])
    chunks, workers = _chunks(), _workers()
    # the jobs: per expert, its tile part (cost per weight row: its padded tokens) and its panel part
    a, b = PANEL_ROW_COST
    cost = np.concatenate((tc + pad, np.where(npan > 0, a + b * npan, 0))).astype(np.float64)
    road = np.repeat(np.arange(2), G)
    keep = cost > 0
    expert = np.tile(np.arange(G), 2)[keep]
    acts = _quantized(xs, {w_gate.kind, w_up.kind}, chunks)
    h = np.empty((xs.shape[0], F), np.float32)
    hp = np.empty((pstart[-1], F, PANEL), np.float32)
    jobs = mixed_jobs(cost[keep], road[keep], expert, F, workers)
    expert_up_mixed(
        w_gate.kind, w_up.kind, *_flat(w_gate), *_flat(w_up), acts, xt, groups, bounds, pstart, jobs, workers, h,
        hp, prefill_gemm.block_rows(2 * d),  # (gate and up rows: one widened block's bytes together)
    )  # fmt: skip
    acts = _quantized(h, {w_down.kind}, chunks)
    y = np.empty(xs.shape, np.float32)
    yp = np.empty((ybase[-1], d), np.float32)
    jobs = mixed_jobs(cost[keep], road[keep], expert, d, workers)
    expert_down_mixed(
        w_down.kind, *_flat(w_down), acts, hp, groups, bounds, pstart, ybase, pc, jobs, workers, y, yp,
        prefill_gemm.block_rows(F),
    )  # fmt: skip
    out = np.empty((len(tokens), d), np.float32)
    out[tile_src] = y[tile_dst]
    out[pan_src] = yp
    return out


def _moe_prefill_quant(x, experts, weights, w_gate, w_up, w_down, use_int: bool) -> np.ndarray:
    # x [N, d] f32, routing [N, k], stacked quantized experts -> [N, d]: the pairs grouped by expert, each routed
    # expert's blocks read once for all its tokens: dotted with each of them (quant.moe_up_grouped /
    # moe_down_grouped, x and h quantized once) or, for an expert with many tokens, widened into BLAS
    x2 = _rows(x)
    N, k = experts.shape
    flat = experts.reshape(-1)
    order = np.argsort(flat, kind="stable").astype(np.int64)  # pair ids (token·k + slot), by expert
    groups, counts = np.unique(flat, return_counts=True)
    bounds = np.concatenate(([0], np.cumsum(counts))).astype(np.int64)
    y = np.empty((N * k, x2.shape[1]), np.float32)  # each pair's expert output, before its routing weight
    many = counts >= BLAS_MIN_TOKENS["int8" if use_int else "float"]
    for j in np.nonzero(many)[0]:  # BLAS: the expert's blocks widened a slab at a time (linear.py)
        pairs = order[bounds[j] : bounds[j + 1]]
        e = groups[j]
        y[pairs] = swiglu(x2[pairs // k], w_gate[e], w_up[e], w_down[e], False, "float")
    few = np.nonzero(~many)[0]
    if len(few):  # one launch per projection for every other routed expert
        sub = np.concatenate([order[bounds[j] : bounds[j + 1]] for j in few])
        sub_bounds = np.concatenate(([0], np.cumsum(counts[few]))).astype(np.int64)
        sub_groups = groups[few].astype(np.int64)
        per = max(1, _chunks() // len(few))  # row chunks per expert: enough work items for every thread
        if use_int and MOE_PREFILL_TILES:  # the activations gathered by expert, each expert's rows in tiles
            y[sub] = _experts_mixed(x2, sub // k, w_gate, w_up, w_down, sub_groups, counts[few])
        else:
            h = np.empty((N * k, w_gate.shape[1]), np.float32)  # (rows of pairs in `sub` only are written)
            rows = use_int and MOE_ROW_DOTS  # the row dots on whole stacks (see _moe_decode_quant)
            acts = quant.activations(x2, {w_gate.kind, w_up.kind}, use_int)
            if rows:
                quant.moe_up_grouped_int(
                    w_gate.kind, w_up.kind, *_flat(w_gate), *_flat(w_up), acts[1:6], k, sub_groups, sub,
                    sub_bounds, per, h,
                )  # fmt: skip
            else:
                quant.moe_up_grouped(
                    use_int, w_gate.kind, w_up.kind, w_gate.data, w_gate.data8, w_up.data, w_up.data8, acts, k,
                    sub_groups, sub, sub_bounds, per, h,
                )  # fmt: skip
            if many.any():  # (pairs of the BLAS experts: quantized, never read)
                h[np.setdiff1d(np.arange(N * k), sub)] = 0
            acts = quant.activations(h, {w_down.kind}, use_int)
            if rows:
                quant.moe_down_grouped_int(
                    w_down.kind, *_flat(w_down), acts[1:6], sub_groups, sub, sub_bounds, per, y
                )
            else:
                quant.moe_down_grouped(
                    use_int, w_down.kind, w_down.data, w_down.data8, acts, sub_groups, sub, sub_bounds, per, y
                )
    out = np.empty(x2.shape, np.float32)
    quant.moe_combine(y, weights.astype(np.float32), out)
    return out


# OpenBLAS threads for the router's product with a float32 router weight (GGUF files keep ffn_gate_inp in F32).
# Its product is tiny ([tokens, 2048] · [2048, 128]ᵀ), but with OpenBLAS's 2 threads its idle worker spins ~0.1 s
# after the call, on a core the experts' numba threads, which run next, need (attention's blocks avoid BLAS's
# threads for the same reason). A 128-token prefill of the 2-layer Qwen3-30B-A3B-shaped Q4_K_M: 151 tok/s with
# the router on one thread against 102 with two (2 threads, load 6.5, same process, interleaved, best of 5;
# the router logits move by float32 rounding: last logits 1.3e-6). None: as the process has it
ROUTER_BLAS_THREADS: int | None = 1


def moe_block(
    x,
    w_router,
    w_gate,
    w_up,
    w_down,
    top_k: int,
    norm_topk_prob: bool,
    bf16_inputs: bool = False,
    quant_gemv: str = "int8",
):  # [N, d], [E, d], [E, f, d], [E, f, d], [E, d, f] -> output [N, d], router logits [N, E]
    if isinstance(w_router, np.ndarray):  # float32 router weight: BLAS, on one thread (ROUTER_BLAS_THREADS)
        with blas_threads(ROUTER_BLAS_THREADS):
            router_logits = linear(x, w_router, bf16_inputs, quant_gemv)
    else:
        router_logits = linear(x, w_router, bf16_inputs, quant_gemv)
    weights, experts = route(router_logits, top_k, norm_topk_prob)  # the reference's routing, ties included
    quantized = all(isinstance(w, QuantWeight) for w in (w_gate, w_up, w_down))
    if quantized and x.shape[0] <= QUANT_GEMV_MAX_ROWS:  # decode: every pair's rows over the threads together
        return _moe_decode_quant(
            x, experts, weights, w_gate, w_up, w_down, quant_gemv == "int8"
        ), router_logits
    if quantized:  # prefill: grouped by expert, each routed expert's blocks read once
        return _moe_prefill_quant(
            x, experts, weights, w_gate, w_up, w_down, quant_gemv == "int8"
        ), router_logits
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
        y = swiglu(
            x[token], _expert(w_gate, e), _expert(w_up, e), _expert(w_down, e), bf16_inputs, quant_gemv
        )
        out[token] += y * weights[token, slot, None]  # a token picks an expert at most once: no repeats
    return out, router_logits
