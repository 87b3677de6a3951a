"""One whole decoder layer of a decode step (one new position per row) in one call from Python.

Decoding one token of Qwen3-0.6B runs 28 layers of ~11 backend calls each (norms, the q/k/v GEMV, QK-Norm, RoPE,
the cache write, attention, o_proj, SwiGLU) and NumPy's reshapes and residual adds between them: ~300 trips from
Python into a kernel per token, each a few microseconds of Python, plus a thread wake-up for every parallel
kernel the threads had already fallen asleep before (see settings.py). Here the layer is one Numba call:

    x ─ RMSNorm ─ [q|k|v] GEMV ─ QK-Norm ─ RoPE ─ write k, v into the cache ─ attention ─ o_proj GEMV ─ + x ─┐
      ┌───────────────────────────────────────────────────────────────────────────────────────────────────────┘
      └─ RMSNorm ─ gate/up GEMV, SiLU·mul ─ down GEMV ─ + ─> x

By default (ONE_REGION) the whole layer is ONE parallel region: a `prange` over the threads, each running the
layer's phases (norm, q/k/v rows, RoPE and the cache write, attention, o_proj rows, residual and norm, gate/up
rows, down rows, residual) and taking chunks of each phase through atomic counters (phases.py); the small serial
steps (kilobytes) are one-chunk phases. One fork and one join per layer instead of five, and a thread that another
process holds up leaves its chunks to the other. The other form, `_layer_bf16` / `_layer_quant`, runs the GEMVs
and attention as five `prange` loops of one parallel function and the small steps on the calling thread.
For bf16 weights, decode_step.py goes one step further: every layer's `_bf16_phases`, the final norm and the
lm_head in one region per token (the model asks for that first; this module's layer is its fallback and its A/B).
Both call the same serial kernels as the kernel-by-kernel path (gemv_one_row.py, linear.py, norm_rope.py,
attention.py) on the same rows, so the results are bit-identical to it (the tests check this).

One concept: the decode layer in one call, in its two forms for bf16 and for quantized weights; they share their
steps and helpers line for line, and split into modules they would drift apart.

`decode_layer` returns None where it does not apply — a prompt (T > 1), a batch of rows (B > 1: decode_tiles.py's
multi-row kernels read each weight row once for all of them), no cache or a ragged one, a float16
cache, an MoE layer, weights neither all bf16 nor all quantized, quantized weights in the "float" quant_gemv mode,
matmul_precision "medium" — and the model then runs the layer kernel by kernel.

Quantized weights (GGUF's q8_0, q4_k, q6_k; Q4_K_M mixes q4_k and q6_k within a layer) take a second layer
function, `_layer_quant` (one region: `_layer_quant_region`), of the same shape for the "int8" mode: the
activation quantized by one thread four times (once for q/k/v, once for o_proj, once for gate/up, once for SiLU·mul's output before down), and
quant.py's row dots (`_gemv_rows_int`: avx2.py's row intrinsics, or their plain loops without AVX2) over the
threads. The weights' formats arrive as a number per matrix and the row dot dispatches on it, so one compiled
function serves every mix. It runs the kernel-by-kernel int8 path's steps — quant.gemv's quantization and row
dots, linear.py's `_silu_mul` — in its order, so the results are bit-identical to it (tests/test_numba_quant.py).
"""

from __future__ import annotations

import weakref

import numba
import numpy as np
from numba import njit, prange, types

from tinyqwen.backends.numba.attention import _attend_group
from tinyqwen.backends.numba.gemv_one_row import (
    _gate_up1_rows_bf16,
    _gemv1_rows_bf16,
    _split_pairs,
    _split_part,
)
from tinyqwen.backends.numba.intrinsics import _to_bf16
from tinyqwen.backends.numba.linear import _chunks, _silu_mul, _starts
from tinyqwen.backends.numba.norm_rope import _rms_norm
from tinyqwen.backends.numba.phases import LINE, claim, finish, wait_finished
from tinyqwen.backends.numba.quant import (
    _gemv_rows_int,
    _needs,
    _quantize_acts,
    quantize_q8_0_rows,
    quantize_q8_k_rows,
)
from tinyqwen.backends.numba.weights import BF16Weight, QuantWeight


def _encode(cache, value):  # one float32 value -> what `cache` stores (compiled by the overload below)
    raise NotImplementedError


@numba.extending.overload(_encode)
def _encode_overload(cache, value):
    # a float32 cache stores the value; a bf16 cache (uint16 bit patterns) its nearest bf16, rounded as the
    # KV cache's own float32_to_bf16 (nearest, ties to even)
    if cache.dtype == types.uint16:
        return lambda cache, value: _to_bf16(value)
    if isinstance(cache.dtype, types.Float):
        return lambda cache, value: value
    return None


@njit(cache=True)
def _rope_heads(x, cos, sin, b, out):  # x [H, d] (one row's heads), cos/sin [B, d] -> out [H, d]
    # norm_rope._rope's arithmetic, value for value (no fast-math: the same rounding)
    H, d = x.shape
    half = d // 2
    for h in range(H):
        for j in range(half):
            a, c = x[h, j], x[h, j + half]
            out[h, j] = a * cos[b, j] - c * sin[b, j]
            out[h, j + half] = c * cos[b, j + half] + a * sin[b, j + half]


@njit(cache=True)
def _qk_rope_store(q, k, v, q_norm, k_norm, eps, qk_norm, cos, sin, kc, vc, pos, q_out, qn, kn, kr):
    # q [M, Hq·d], k/v [M, Hkv·d] -> q_out [M, Hq, d] (normed, rotated); k (normed, rotated) and v written into
    # the caches at `pos`. qn/kn/kr: scratch [Hq, d], [Hkv, d] x2
    M = q.shape[0]
    Hq, d = qn.shape
    Hkv = kn.shape[0]
    for m in range(M):
        qm = q[m].reshape((Hq, d))
        km = k[m].reshape((Hkv, d))
        if qk_norm:
            _rms_norm(qm, q_norm, eps, qn)
            _rms_norm(km, k_norm, eps, kn)
            _rope_heads(qn, cos, sin, m, q_out[m])
            _rope_heads(kn, cos, sin, m, kr)
        else:
            _rope_heads(qm, cos, sin, m, q_out[m])
            _rope_heads(km, cos, sin, m, kr)
        for h in range(Hkv):
            for j in range(d):
                kc[m, h, pos, j] = _encode(kc, kr[h, j])
                vc[m, h, pos, j] = _encode(vc, v[m, h * d + j])


@njit(cache=True)
def _add(x, y, out):  # [M, H] x2 -> out [M, H]: the residual, as NumPy's x + y
    M, H = x.shape
    for m in range(M):
        for j in range(H):
            out[m, j] = x[m, j] + y[m, j]


@njit(parallel=True, cache=True, nogil=True)
def _layer_bf16(x, in_norm, wqkv, q_norm, k_norm, wo, post_norm, wg, wu, wd, cos, sin, kc, vc, mask, pos,
                eps, qk_norm, heads, head_dim, starts_qkv, starts_o, starts_d, chunks):  # fmt: skip
    # x [1, H] f32 -> [1, H]: one decoder layer for one row of one new position (see the module docstring; the
    # GEMVs are linear.py's one-row kernels, so H, the attention width and F are even).
    # wqkv: (q, k, v) bf16 bits; kc, vc [M, Hkv, max_len, d] the whole cache; mask [M, pos + 1] bool
    M, H = x.shape
    Hkv = kc.shape[1]
    wq, wk, wv = wqkv
    F = wg.shape[0]
    h = np.empty_like(x)
    _rms_norm(x, in_norm, eps, h)
    he = np.empty(H // 2, np.float32)  # each GEMV's input split into its even and odd values (linear.py)
    ho = np.empty(H // 2, np.float32)
    _split_pairs(h, he, ho)
    q = np.empty((M, wq.shape[0]), np.float32)
    k = np.empty((M, wk.shape[0]), np.float32)
    v = np.empty((M, wv.shape[0]), np.float32)
    total = starts_qkv[-1]
    c1 = min(total, chunks)
    size = (total + c1 - 1) // c1
    for c in prange(c1):
        _gemv1_rows_bf16(he, ho, wqkv, (q, k, v), starts_qkv, c * size, min(total, (c + 1) * size))
    qr = np.empty((M, heads, head_dim), np.float32)
    qn = np.empty((heads, head_dim), np.float32)
    kn = np.empty((Hkv, head_dim), np.float32)
    kr = np.empty((Hkv, head_dim), np.float32)
    _qk_rope_store(q, k, v, q_norm, k_norm, eps, qk_norm, cos, sin, kc, vc, pos, qr, qn, kn, kr)
    att = np.empty((M, heads, head_dim), np.float32)
    for bh in prange(M * Hkv):
        _attend_group(qr, kc, vc, mask, att, bh // Hkv, bh % Hkv, pos + 1)
    att2 = att.reshape((M, heads * head_dim))
    ae = np.empty(heads * head_dim // 2, np.float32)
    ao = np.empty(heads * head_dim // 2, np.float32)
    _split_pairs(att2, ae, ao)
    o = np.empty((M, H), np.float32)
    c2 = min(H, chunks)
    size2 = (H + c2 - 1) // c2
    for c in prange(c2):
        _gemv1_rows_bf16(ae, ao, (wo,), (o,), starts_o, c * size2, min(H, (c + 1) * size2))
    x1 = np.empty_like(x)
    _add(x, o, x1)
    _rms_norm(x1, post_norm, eps, h)
    _split_pairs(h, he, ho)
    g = np.empty((M, F), np.float32)
    c3 = min(F, chunks)
    size3 = (F + c3 - 1) // c3
    for c in prange(c3):
        _gate_up1_rows_bf16(he, ho, wg, wu, g, c * size3, min(F, (c + 1) * size3))
    ge = np.empty(F // 2, np.float32)
    go = np.empty(F // 2, np.float32)
    _split_pairs(g, ge, go)
    for c in prange(c2):
        _gemv1_rows_bf16(ge, go, (wd,), (o,), starts_d, c * size2, min(H, (c + 1) * size2))
    out = np.empty_like(x)
    _add(x1, o, out)
    return out


# ---- the layer in ONE parallel region (phases.py): each thread runs every phase, taking chunks as it goes
#
# The same serial kernels on the same rows as _layer_bf16 / _layer_quant, so the results are bit-identical to
# them (only which thread computes a row changes, never how); the threads meet at the phase boundaries instead
# of at five joins and five forks.
# Measured (benchmarks/bench_decode_step.py fused, Qwen3-0.6B-shaped, 2 threads, AMD EPYC with 2 cores shared by
# other processes, load average 8-9, same process, interleaved, best of 2-3): bf16 285 ms per step in one region,
# 328 with five loops, 369 kernel by kernel (wall; CPU time 185 / 229 / 249); Q4_K_M 99 / 155 / 181 ms wall.
# The region's gain is largest on a busy machine (no thread waits for a descheduled partner's fixed block).
ONE_REGION = True  # False: the five-`prange` layer functions
CHUNK_BYTES = 128 << 10  # weight bytes per GEMV chunk (a thread's unit of work): ~10-20 us of streaming


def _workers() -> (
    int
):  # iterations of the one-region `prange`: one per thread (any count works, see phases.py)
    return numba.get_num_threads()


def _chunk_rows(rows: int, row_bytes: int) -> tuple[int, int]:  # -> (chunks, rows per chunk)
    size = max(1, min(rows, CHUNK_BYTES // max(1, row_bytes)))
    return (rows + size - 1) // size, size


@njit(cache=True)
def _bf16_phases(ctr, chunks, sizes, x, in_norm, wqkv, q_norm, k_norm, wo, post_norm, wg, wu, wd, cos, sin, kc,
                 vc, mask, pos, eps, qk_norm, starts_qkv, starts_o, starts_d, h, q, k, v, qr, qn, kn, kr, att, o,
                 x1, g, o2, out, he, ho, ae, ao, ge, go):  # fmt: skip
    # one thread's run through the layer's 9 phases (chunks [9], sizes [9]: rows per chunk); one row (M = 1).
    # Each GEMV's input is split into even and odd values (linear.py) by the chunks that write it
    Hkv, d = kc.shape[1], kc.shape[3]
    group = att.shape[1] // Hkv
    att2 = att.reshape((1, att.shape[1] * d))
    for p in range(9):
        if p > 0:
            wait_finished(ctr, p - 1, chunks[p - 1])
        while True:
            c = claim(ctr, p)
            if c >= chunks[p]:
                break
            lo = c * sizes[p]
            if p == 0:
                _rms_norm(x, in_norm, eps, h)
                _split_pairs(h, he, ho)
            elif p == 1:
                _gemv1_rows_bf16(he, ho, wqkv, (q, k, v), starts_qkv, lo, min(starts_qkv[-1], lo + sizes[p]))
            elif p == 2:
                _qk_rope_store(q, k, v, q_norm, k_norm, eps, qk_norm, cos, sin, kc, vc, pos, qr, qn, kn, kr)
            elif p == 3:
                _attend_group(qr, kc, vc, mask, att, 0, c, pos + 1)
                _split_part(att2, ae, ao, c * group * d, (c + 1) * group * d)  # this kv head's query heads
            elif p == 4:
                _gemv1_rows_bf16(ae, ao, (wo,), (o,), starts_o, lo, min(starts_o[-1], lo + sizes[p]))
            elif p == 5:
                _add(x, o, x1)
                _rms_norm(x1, post_norm, eps, h)
                _split_pairs(h, he, ho)
            elif p == 6:
                hi = min(wg.shape[0], lo + sizes[p])
                _gate_up1_rows_bf16(he, ho, wg, wu, g, lo, hi)
                _split_part(g, ge, go, lo, hi)
            elif p == 7:
                _gemv1_rows_bf16(ge, go, (wd,), (o2,), starts_d, lo, min(starts_d[-1], lo + sizes[p]))
            else:
                _add(x1, o2, out)
            finish(ctr, p)


@njit(cache=True)
def _attention_scratch(x, nq, nk, nv, heads, head_dim, Hkv):
    # the arrays a layer's phases write up to the residual after attention, unwritten, for x [M, H] and q/k/v of
    # nq/nk/nv rows: (h, q, k, v, qr, qn, kn, kr, att, o, x1), the same for bf16 and quantized weights. One helper
    # for both layers' regions and both whole steps' (decode_step.py), so they cannot drift apart
    M, H = x.shape
    f32 = np.float32
    return (
        np.empty_like(x),  # h: a norm's output
        np.empty((M, nq), f32),
        np.empty((M, nk), f32),
        np.empty((M, nv), f32),
        np.empty((M, heads, head_dim), f32),  # qr: q normed and rotated
        np.empty((heads, head_dim), f32),  # qn, kn, kr: QK-Norm's and RoPE's scratch
        np.empty((Hkv, head_dim), f32),
        np.empty((Hkv, head_dim), f32),
        np.empty((M, heads, head_dim), f32),  # att: attention's output
        np.empty((M, H), f32),  # o: o_proj's output
        np.empty_like(x),  # x1: the residual after attention
    )


@njit(cache=True)
def _bf16_scratch(x, nq, nk, nv, F, heads, head_dim, Hkv):
    # the arrays _bf16_phases writes, unwritten, for F hidden units: _attention_scratch's, then
    # (g, o2, he, ho, ae, ao, ge, go)
    M, H = x.shape
    f32 = np.float32
    return _attention_scratch(x, nq, nk, nv, heads, head_dim, Hkv) + (
        np.empty((M, F), f32),  # g: SiLU(gate)·up
        np.empty((M, H), f32),  # o2: down's output
        np.empty(H // 2, f32),  # he, ho, ae, ao, ge, go: the GEMVs' inputs split into even and odd values
        np.empty(H // 2, f32),
        np.empty(heads * head_dim // 2, f32),
        np.empty(heads * head_dim // 2, f32),
        np.empty(F // 2, f32),
        np.empty(F // 2, f32),
    )


@njit(parallel=True, cache=True, nogil=True)
def _layer_bf16_region(x, in_norm, wqkv, q_norm, k_norm, wo, post_norm, wg, wu, wd, cos, sin, kc, vc, mask, pos,
                       eps, qk_norm, heads, head_dim, starts_qkv, starts_o, starts_d, chunks, sizes, workers):  # fmt: skip
    # _layer_bf16's result from one `prange` over `workers` threads (any number ≥ 1: see phases.py)
    wq, wk, wv = wqkv
    h, q, k, v, qr, qn, kn, kr, att, o, x1, g, o2, he, ho, ae, ao, ge, go = _bf16_scratch(
        x, wq.shape[0], wk.shape[0], wv.shape[0], wg.shape[0], heads, head_dim, kc.shape[1]
    )
    out = np.empty_like(x)
    ctr = np.zeros(2 * 9 * LINE, np.int64)
    for _ in prange(workers):
        _bf16_phases(ctr, chunks, sizes, x, in_norm, wqkv, q_norm, k_norm, wo, post_norm, wg, wu, wd, cos, sin,
                     kc, vc, mask, pos, eps, qk_norm, starts_qkv, starts_o, starts_d, h, q, k, v, qr, qn, kn, kr,
                     att, o, x1, g, o2, out, he, ho, ae, ao, ge, go)  # fmt: skip
    return out


def _bf16_plan(
    M, H, wq, wk, wv, wo, wg, wd, Hkv
) -> tuple[np.ndarray, np.ndarray]:  # -> chunks [9], sizes [9]
    rows_qkv = wq.shape[0] + wk.shape[0] + wv.shape[0]
    plan = [
        (1, 1),  # input norm
        _chunk_rows(rows_qkv, wq.shape[1] * 2),
        (1, 1),  # QK-Norm, RoPE, the cache write
        (Hkv, 1),  # attention: one kv head's group per chunk
        _chunk_rows(wo.shape[0], wo.shape[1] * 2),
        (1, 1),  # residual, post-attention norm
        _chunk_rows(wg.shape[0], wg.shape[1] * 4),  # a gate row and its up row
        _chunk_rows(wd.shape[0], wd.shape[1] * 2),
        (1, 1),  # residual
    ]
    return np.array([c for c, _ in plan], np.int64), np.array([s for _, s in plan], np.int64)


@njit(parallel=True, cache=True, nogil=True)
def _layer_quant(x, in_norm, wqkv, wqkv8, q_norm, k_norm, wo, wo8, post_norm, wgu, wgu8, wd, wd8, kinds, need,
                 cos, sin, kc, vc, mask, pos, eps, qk_norm, heads, head_dim, starts_qkv, starts_o, starts_gu,
                 starts_d, chunks):  # fmt: skip
    # x [M, H] f32 -> [M, H]: _layer_bf16 with quantized weights, "int8". wqkv/wqkv8: (q, k, v) as uint8 / int8
    # block bytes [N, bytes]; wgu/wgu8: (gate, up); wo, wd: 1-tuples. kinds [7]: the block formats of q, k, v, o,
    # gate, up, down; need [8]: (Q8_0, Q8_K) forms of the activation for q/k/v, o, gate/up, down (quant._needs)
    M, H = x.shape
    Hkv = kc.shape[1]
    h = np.empty_like(x)
    _rms_norm(x, in_norm, eps, h)
    q = np.empty((M, wqkv[0].shape[0]), np.float32)
    k = np.empty((M, wqkv[1].shape[0]), np.float32)
    v = np.empty((M, wqkv[2].shape[0]), np.float32)
    acts = _quantize_acts(h, need[0], need[1])
    total = starts_qkv[-1]
    c1 = min(total, chunks)
    size = (total + c1 - 1) // c1
    for c in prange(c1):
        _gemv_rows_int(
            kinds[0:3], wqkv, wqkv8, (q, k, v), starts_qkv, acts, c * size, min(total, (c + 1) * size)
        )
    qr = np.empty((M, heads, head_dim), np.float32)
    qn = np.empty((heads, head_dim), np.float32)
    kn = np.empty((Hkv, head_dim), np.float32)
    kr = np.empty((Hkv, head_dim), np.float32)
    _qk_rope_store(q, k, v, q_norm, k_norm, eps, qk_norm, cos, sin, kc, vc, pos, qr, qn, kn, kr)
    att = np.empty((M, heads, head_dim), np.float32)
    for bh in prange(M * Hkv):
        _attend_group(qr, kc, vc, mask, att, bh // Hkv, bh % Hkv, pos + 1)
    att2 = att.reshape((M, heads * head_dim))
    acts_a = _quantize_acts(att2, need[2], need[3])
    o = np.empty((M, H), np.float32)
    c2 = min(H, chunks)
    size2 = (H + c2 - 1) // c2
    for c in prange(c2):
        _gemv_rows_int(kinds[3:4], wo, wo8, (o,), starts_o, acts_a, c * size2, min(H, (c + 1) * size2))
    x1 = np.empty_like(x)
    _add(x, o, x1)
    _rms_norm(x1, post_norm, eps, h)
    F = wgu[0].shape[0]
    g = np.empty((M, F), np.float32)
    u = np.empty((M, F), np.float32)
    acts_h = _quantize_acts(h, need[4], need[5])
    total3 = starts_gu[-1]
    c3 = min(total3, chunks)
    size3 = (total3 + c3 - 1) // c3
    for c in prange(c3):
        _gemv_rows_int(
            kinds[4:6], wgu, wgu8, (g, u), starts_gu, acts_h, c * size3, min(total3, (c + 1) * size3)
        )
    acts_f = _quantize_acts(_silu_mul(g, u), need[6], need[7])
    o2 = np.empty((M, H), np.float32)
    for c in prange(c2):
        _gemv_rows_int(kinds[6:7], wd, wd8, (o2,), starts_d, acts_f, c * size2, min(H, (c + 1) * size2))
    out = np.empty_like(x)
    _add(x1, o2, out)
    return out


@njit(cache=True)
def _act_buffers(
    M, K, need0, needk
):  # _quantize_acts's arrays, unwritten: (Q8_0 codes, scales, Q8_K codes, ...)
    return (
        np.empty((M, K if need0 else 0), np.int8),
        np.empty((M, K // 32 if need0 else 0), np.float32),
        np.empty((M, K if needk else 0), np.int8),
        np.empty((M, K // 256 if needk else 0), np.float32),
        np.empty((M, K // 32 if needk else 0), np.int32),
    )


@njit(cache=True)
def _quantize_into(x, acts, need0, needk):  # _quantize_acts into existing arrays
    if need0:
        quantize_q8_0_rows(x, acts[0], acts[1])
    if needk:
        quantize_q8_k_rows(x, acts[2], acts[3], acts[4])


@njit(cache=True)
def _quant_phases(ctr, chunks, sizes, x, in_norm, wqkv, wqkv8, q_norm, k_norm, wo, wo8, post_norm, wgu, wgu8, wd,
                  wd8, kinds, need, cos, sin, kc, vc, mask, pos, eps, qk_norm, starts_qkv, starts_o, starts_gu,
                  starts_d, h, q, k, v, qr, qn, kn, kr, att, o, x1, g, u, o2, out, acts, acts_a, acts_h, acts_f):  # fmt: skip
    # one thread's run through _layer_quant's 11 phases (chunks [11], sizes [11]: rows per chunk)
    Hkv = kc.shape[1]
    att2 = att.reshape((att.shape[0], att.shape[1] * att.shape[2]))
    for p in range(11):
        if p > 0:
            wait_finished(ctr, p - 1, chunks[p - 1])
        while True:
            c = claim(ctr, p)
            if c >= chunks[p]:
                break
            lo = c * sizes[p]
            if p == 0:
                _rms_norm(x, in_norm, eps, h)
                _quantize_into(h, acts, need[0], need[1])
            elif p == 1:
                hi = min(starts_qkv[-1], lo + sizes[p])
                _gemv_rows_int(kinds[0:3], wqkv, wqkv8, (q, k, v), starts_qkv, acts, lo, hi)
            elif p == 2:
                _qk_rope_store(q, k, v, q_norm, k_norm, eps, qk_norm, cos, sin, kc, vc, pos, qr, qn, kn, kr)
            elif p == 3:
                _attend_group(qr, kc, vc, mask, att, c // Hkv, c % Hkv, pos + 1)
            elif p == 4:
                _quantize_into(att2, acts_a, need[2], need[3])
            elif p == 5:
                hi = min(starts_o[-1], lo + sizes[p])
                _gemv_rows_int(kinds[3:4], wo, wo8, (o,), starts_o, acts_a, lo, hi)
            elif p == 6:
                _add(x, o, x1)
                _rms_norm(x1, post_norm, eps, h)
                _quantize_into(h, acts_h, need[4], need[5])
            elif p == 7:
                hi = min(starts_gu[-1], lo + sizes[p])
                _gemv_rows_int(kinds[4:6], wgu, wgu8, (g, u), starts_gu, acts_h, lo, hi)
            elif p == 8:
                _quantize_into(_silu_mul(g, u), acts_f, need[6], need[7])
            elif p == 9:
                hi = min(starts_d[-1], lo + sizes[p])
                _gemv_rows_int(kinds[6:7], wd, wd8, (o2,), starts_d, acts_f, lo, hi)
            else:
                _add(x1, o2, out)
            finish(ctr, p)


@njit(cache=True)
def _quant_scratch(x, nq, nk, nv, F, heads, head_dim, Hkv, need):
    # the arrays _quant_phases writes, unwritten, for F hidden units and the activation forms `need` [8] asks for:
    # _attention_scratch's, then (g, u, o2, acts, acts_a, acts_h, acts_f)
    M, H = x.shape
    f32 = np.float32
    return _attention_scratch(x, nq, nk, nv, heads, head_dim, Hkv) + (
        np.empty((M, F), f32),  # g, u: gate's and up's outputs
        np.empty((M, F), f32),
        np.empty((M, H), f32),  # o2: down's output
        _act_buffers(M, H, need[0], need[1]),  # the int8 forms of the four GEMVs' inputs
        _act_buffers(M, heads * head_dim, need[2], need[3]),
        _act_buffers(M, H, need[4], need[5]),
        _act_buffers(M, F, need[6], need[7]),
    )


@njit(parallel=True, cache=True, nogil=True)
def _layer_quant_region(x, in_norm, wqkv, wqkv8, q_norm, k_norm, wo, wo8, post_norm, wgu, wgu8, wd, wd8, kinds,
                        need, cos, sin, kc, vc, mask, pos, eps, qk_norm, heads, head_dim, starts_qkv, starts_o,
                        starts_gu, starts_d, chunks, sizes, workers):  # fmt: skip
    # _layer_quant's result from one `prange` over `workers` threads (any number ≥ 1: see phases.py)
    h, q, k, v, qr, qn, kn, kr, att, o, x1, g, u, o2, acts, acts_a, acts_h, acts_f = _quant_scratch(
        x, wqkv[0].shape[0], wqkv[1].shape[0], wqkv[2].shape[0], wgu[0].shape[0], heads, head_dim, kc.shape[1],
        need,
    )  # fmt: skip
    out = np.empty_like(x)
    ctr = np.zeros(2 * 11 * LINE, np.int64)
    for _ in prange(workers):
        _quant_phases(ctr, chunks, sizes, x, in_norm, wqkv, wqkv8, q_norm, k_norm, wo, wo8, post_norm, wgu, wgu8,
                      wd, wd8, kinds, need, cos, sin, kc, vc, mask, pos, eps, qk_norm, starts_qkv, starts_o,
                      starts_gu, starts_d, h, q, k, v, qr, qn, kn, kr, att, o, x1, g, u, o2, out, acts, acts_a,
                      acts_h, acts_f)  # fmt: skip
    return out


def _quant_plan(M, weights, Hkv) -> tuple[np.ndarray, np.ndarray]:  # -> chunks [11], sizes [11]
    wq, wk, wv, wo, wg, wu, wd = weights
    plan = [
        (1, 1),  # input norm, x quantized
        _chunk_rows(wq.shape[0] + wk.shape[0] + wv.shape[0], wq.data.shape[1]),
        (1, 1),  # QK-Norm, RoPE, the cache write
        (M * Hkv, 1),  # attention: one (row, kv head) group per chunk
        (1, 1),  # attention's output quantized
        _chunk_rows(wo.shape[0], wo.data.shape[1]),
        (1, 1),  # residual, post-attention norm, quantized
        _chunk_rows(wg.shape[0] + wu.shape[0], wg.data.shape[1]),
        (1, 1),  # SiLU·mul, quantized
        _chunk_rows(wd.shape[0], wd.data.shape[1]),
        (1, 1),  # residual
    ]
    return np.array([c for c, _ in plan], np.int64), np.array([s for _, s in plan], np.int64)


def _position_args(cos, sin, kc, vc, mask, pos: int, config) -> tuple:
    # the run of arguments every fused kernel takes between its weights and its row starts, in their order:
    # (cos [B, d], sin [B, d], kc, vc, mask [B, pos + 1], pos, eps as float32, qk_norm, heads, head_dim), from the
    # model's cos/sin [B, 1, d] and mask [B, 1, pos + 1]; kc, vc: one layer's cache or every layer's (typed Lists).
    # One helper for the bf16 and quantized layers and both whole steps (decode_step.py)
    return (
        np.ascontiguousarray(cos[:, 0]),
        np.ascontiguousarray(sin[:, 0]),
        kc,
        vc,
        np.ascontiguousarray(mask[:, 0]),
        pos,
        np.float32(config.rms_norm_eps),
        config.qk_norm,
        config.num_attention_heads,
        config.head_dim,
    )


# A quantized layer's arguments that do not change from step to step (its weights as tuples, their formats, the
# activation forms they need, the row starts, the chunk plan, the norms as float32), built once per layer and kept
# while the layer, its weights and the plan's inputs are the same objects and numbers: building them took ~25 us of
# Python per layer, 0.7 ms of a ~20 ms Q4_K_M step (28 layers; AMD EPYC, 2 threads). The arguments are the same
# either way, so are the results.
_QUANT_ARGS: dict[
    int, tuple
] = {}  # id(layer) -> (weakref to it, what the arguments came from, the arguments)


def _quant_layer(x2, layer, position, config, weights):
    # [1, H] -> [1, H] through _layer_quant (the checks done by decode_layer); position: _position_args's tuple
    kc = position[2]
    a = layer.attn
    objects = (*weights, layer.input_norm, a.q_norm, a.k_norm, layer.post_attention_norm, config)
    numbers = (
        ONE_REGION,
        CHUNK_BYTES,
        x2.shape[0],
        kc.shape[1],
        _workers() if ONE_REGION else _chunks(),
        config.rms_norm_eps,
        config.qk_norm,
        config.num_attention_heads,
        config.head_dim,
    )
    kept = _QUANT_ARGS.get(id(layer))
    if (
        kept is not None
        and kept[0]() is layer
        and kept[2] == numbers
        and all(s is t for s, t in zip(kept[1], objects, strict=True))
    ):
        head, tail = kept[3]
    else:
        head, tail = _quant_static_args(x2, layer, kc, config, weights)
        key = id(layer)
        try:  # the entry leaves with the layer (it holds the weights: a model let go must free its memory)
            ref = weakref.ref(layer, lambda _, key=key: _QUANT_ARGS.pop(key, None))
        except TypeError:  # a layer that takes no weak reference: built every call
            ref = None
        if ref is not None:
            _QUANT_ARGS[key] = (ref, objects, numbers, (head, tail))
    return (_layer_quant_region if ONE_REGION else _layer_quant)(x2, *head, *position, *tail)


def _quant_static_args(x2, layer, kc, config, weights) -> tuple[tuple, tuple]:
    # _quant_layer's arguments before and after _position_args's (those two runs change only with the layer)
    a = layer.attn
    wq, wk, wv, wo, wg, wu, wd = weights
    kinds = np.array([w.kind for w in weights], np.int64)
    need = np.array(
        [
            *_needs({wq.kind, wk.kind, wv.kind}),
            *_needs({wo.kind}),
            *_needs({wg.kind, wu.kind}),
            *_needs({wd.kind}),
        ]
    )
    f32 = np.float32
    region = ONE_REGION
    if region:
        chunks, sizes = _quant_plan(x2.shape[0], weights, kc.shape[1])
    head = (
        np.asarray(layer.input_norm, f32),
        (wq.data, wk.data, wv.data),
        (wq.data8, wk.data8, wv.data8),
        np.asarray(a.q_norm, f32),
        np.asarray(a.k_norm, f32),
        (wo.data,),
        (wo.data8,),
        np.asarray(layer.post_attention_norm, f32),
        (wg.data, wu.data),
        (wg.data8, wu.data8),
        (wd.data,),
        (wd.data8,),
        kinds,
        need,
    )
    tail = (
        _starts((wq.shape[0], wk.shape[0], wv.shape[0])),
        _starts((wo.shape[0],)),
        _starts((wg.shape[0], wu.shape[0])),
        _starts((wd.shape[0],)),
        *((chunks, sizes, _workers()) if region else (_chunks(),)),
    )
    return head, tail


def decode_layer(
    x, layer, cos, sin, mask, cache, i: int, config, bf16_inputs: bool = False, quant_gemv: str = "int8"
):
    # [B, 1, H] -> [B, 1, H], or None where this fused path does not apply (the model then runs the layer
    # kernel by kernel); the layer's k and v are written into `cache` at its length (the model advances it)
    B, T, H = x.shape
    # a KVCache (one length for every row), told from a ragged one (a length per row) by its fields: the backends
    # sit below the model's layer and import none of its modules
    if (
        B != 1
        or T != 1
        or bf16_inputs
        or cache is None
        or hasattr(cache, "lengths")
        or not hasattr(cache, "keys")
    ):
        return None
    kc, vc = cache.keys[i], cache.values[i]
    if (
        not all(isinstance(a, np.ndarray) and a.flags.c_contiguous for a in (kc, vc))
        or kc.dtype == np.float16
    ):
        return None
    if not isinstance(mask, np.ndarray) or not hasattr(layer.mlp, "up_proj") or hasattr(layer.mlp, "router"):
        return None
    a, f = layer.attn, layer.mlp
    weights = (a.q_proj, a.k_proj, a.v_proj, a.o_proj, f.gate_proj, f.up_proj, f.down_proj)
    if all(isinstance(w, QuantWeight) and w.ndim == 2 for w in weights):
        if quant_gemv != "int8":  # "float": kernel by kernel
            return None
        B, H = x.shape[0], x.shape[2]
        position = _position_args(cos, sin, kc, vc, mask, cache.length, config)
        x2 = np.ascontiguousarray(x.reshape(B, H), np.float32)
        return _quant_layer(x2, layer, position, config, weights).reshape(B, 1, H)
    if not all(isinstance(w, BF16Weight) and w.bits.flags.c_contiguous for w in weights):
        return None
    if len({w.bits.flags.writeable for w in weights[:3]}) != 1:  # one Numba type for the (q, k, v) tuple
        return None
    wq, wk, wv, wo, wg, wu, wd = (w.bits for w in weights)
    if any(w.shape[1] % 2 for w in (wq, wo, wd)):  # linear.py's one-row kernels read weight pairs
        return None
    f32 = np.float32
    args = (
        np.ascontiguousarray(x.reshape(B, H), f32),
        np.asarray(layer.input_norm, f32),
        (wq, wk, wv),
        np.asarray(a.q_norm, f32),
        np.asarray(a.k_norm, f32),
        wo,
        np.asarray(layer.post_attention_norm, f32),
        wg,
        wu,
        wd,
        *_position_args(cos, sin, kc, vc, mask, cache.length, config),
        _starts((wq.shape[0], wk.shape[0], wv.shape[0])),
        _starts((wo.shape[0],)),
        _starts((wd.shape[0],)),
    )
    if ONE_REGION:  # the same arguments, then the region's plan and thread count
        chunks, sizes = _bf16_plan(B, H, wq, wk, wv, wo, wg, wd, kc.shape[1])
        return _layer_bf16_region(*args, chunks, sizes, _workers()).reshape(B, 1, H)
    return _layer_bf16(*args, _chunks()).reshape(B, 1, H)
