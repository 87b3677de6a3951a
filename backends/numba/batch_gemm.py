"""A batched decode step's bf16 products as a small GEMM: token panels, widened weight blocks, a 6 x 16 micro-kernel.

    x [M, K] f32  --once per call-->  xt [P, K, 16]      P = ceil(M / 16) panels of 16 token rows, k-major
    W [N, K] bf16 --a block of R rows at a time--> buf [R, K] f32   (R·K·4 bytes, ~192 KiB: stays in L2)
    for 6 rows of buf, for each panel:   acc[6, 16] = buf[r:r+6] · xt[p]ᵀ      12 AVX2 accumulators

With 16 rows of a continuous-batching step the products are compute-bound, so what counts is FMAs per cycle. The
register tiles in linear.py (4 token rows x 3 weight rows, dot products along k) widen every weight vector in
the loop (two extra vector instructions per three FMAs) and end each tile with twelve horizontal sums; they ran
at ~24 GMAC/s per core here. This is the BLAS-style outer product instead: per k, two vector loads of 16 token
values, six broadcast weights (`vbroadcastss` from memory: a load, no shuffle), twelve FMAs into 6 x 16 sums that
stay in registers for the whole row (12 accumulators + 2 x vectors + 1 broadcast = 15 of AVX2's 16 registers).
LLVM's vectorisers will not build that from scalar Numba code (the loop vectoriser picks k and spills 96
accumulators), so `_mk6x16` writes it in LLVM IR. The weights are widened once per call into `buf` by a plain
vectorised loop, and the next block's bf16 rows are prefetched while the current one is multiplied, so that loop
reads from cache, not from memory.

Numerics: each output is one float32 FMA chain over k in order (no reassociation), so a row's result depends
neither on the other rows of its step nor on its panel; it differs from the tiles' 8-lane sums by float32
rounding (tests/test_batch_gemm.py). Padding rows of the last panel are zeros, computed and never stored.
"""

from __future__ import annotations

import threading

import numba
import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic

from tinyqwen.backends.numba.intrinsics import _bf16, _silu, _weight_of

PANEL = 16  # token rows per panel: two AVX2 vectors of float32
NR = 6  # weight rows per micro-kernel call (6 x 2 accumulators)
UNROLL = 4  # steps of k per pass of the micro-kernel's loop (K must be a multiple), one prefetch per pass
BUF_BYTES = 192 << 10  # the widened block: with the panels (K x 64 bytes each) it stays in a 512 KiB L2


@intrinsic
def _mk6x16(typingctx, xt, p, buf, r0, acc, pf, line0, step):
    """acc[i, :] = Σ_k buf[r0 + i, k] · xt[p, k, :] for i < 6: [P, K, 16] f32, [R, K] f32 -> acc [6, 16] f32.

    One loop over k with 12 <8 x float> accumulators as phi nodes: per k, xt[p, k, 0:8] and [8:16] loaded, each of
    the six weights broadcast and multiplied into both (llvm.fma: one rounding). All arrays C-contiguous, K >= 1.
    Meanwhile it prefetches cache lines of `pf` (any C-contiguous array: the next block's bf16 weights), line
    line0 + (k · step >> 16) at step k: spread over the loop, a few misses in flight at a time, where a burst of
    hundreds of prefetches before the loop overflowed the core's miss buffers and gained nothing (measured).
    """

    def codegen(context, builder, signature, args):
        xa = context.make_array(signature.args[0])(context, builder, args[0])
        ba = context.make_array(signature.args[2])(context, builder, args[2])
        aa = context.make_array(signature.args[4])(context, builder, args[4])
        pa = context.make_array(signature.args[5])(context, builder, args[5])
        i64, i32, f32 = ir.IntType(64), ir.IntType(32), ir.FloatType()
        v8 = ir.VectorType(f32, 8)

        def const(v):
            return ir.Constant(i64, v)

        K = builder.extract_value(xa.shape, 1)
        row_len = builder.extract_value(ba.shape, 1)
        x_base = builder.gep(xa.data, [builder.mul(args[1], builder.mul(K, const(PANEL)))])
        rows = [
            builder.gep(ba.data, [builder.mul(builder.add(args[3], const(i)), row_len)]) for i in range(NR)
        ]
        fma = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(v8, [v8, v8, v8]), "llvm.fma.v8f32"
        )
        zero = ir.Constant(v8, [0.0] * 8)
        undef = ir.Constant(v8, ir.Undefined)
        splat = ir.Constant(ir.VectorType(i32, 8), [0] * 8)
        before = builder.block
        loop = builder.append_basic_block("mk6x16.loop")
        done = builder.append_basic_block("mk6x16.done")
        builder.branch(loop)
        builder.position_at_end(loop)
        k = builder.phi(i64)
        sums = [builder.phi(v8) for _ in range(2 * NR)]
        k.add_incoming(const(0), before)
        for s in sums:
            s.add_incoming(zero, before)
        cur = list(sums)
        for u in range(UNROLL):  # UNROLL steps of k per pass (K is a multiple of UNROLL), one prefetch
            ku = builder.add(k, const(u))
            x_row = builder.gep(x_base, [builder.mul(ku, const(PANEL))])
            x0 = builder.load(builder.bitcast(x_row, v8.as_pointer()), align=4)
            x1 = builder.load(builder.bitcast(builder.gep(x_row, [const(8)]), v8.as_pointer()), align=4)
            for i in range(NR):
                w = builder.load(builder.gep(rows[i], [ku]), align=4)
                wide = builder.shuffle_vector(
                    builder.insert_element(undef, w, ir.Constant(i32, 0)), undef, splat
                )
                cur[2 * i] = builder.call(fma, [wide, x0, cur[2 * i]])
                cur[2 * i + 1] = builder.call(fma, [wide, x1, cur[2 * i + 1]])
        new = cur
        line = builder.add(args[6], builder.ashr(builder.mul(k, args[7]), const(16)))
        i8p = ir.IntType(8).as_pointer()
        address = builder.gep(builder.bitcast(pa.data, i8p), [builder.shl(line, const(6))])
        prefetch = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(ir.VoidType(), [i8p, i32, i32, i32]), "llvm.prefetch.p0i8"
        )
        builder.call(prefetch, [address, ir.Constant(i32, 0), ir.Constant(i32, 3), ir.Constant(i32, 1)])
        k_next = builder.add(k, const(UNROLL))
        end = builder.block
        k.add_incoming(k_next, end)
        for s, n in zip(sums, new, strict=True):
            s.add_incoming(n, end)
        builder.cbranch(builder.icmp_signed("<", k_next, K), loop, done)
        builder.position_at_end(done)
        for j, n in enumerate(new):
            builder.store(n, builder.bitcast(builder.gep(aa.data, [const(8 * j)]), v8.as_pointer()), align=4)
        return context.get_dummy_value()

    return types.void(xt, p, buf, r0, acc, pf, line0, step), codegen


@njit(cache=True, error_model="numpy")
def _panel_rows(xt, M, ws, outs, starts, lo, hi, buf, acc):  # stacked rows lo..hi of n x [N_i, K] -> outs
    P, K = xt.shape[0], xt.shape[1]
    R = buf.shape[0]
    for b in range(lo, hi, R):
        n = min(hi, b + R) - b
        i = _weight_of(starts, 0, b)
        j = i
        for r in range(n):  # widen the block (its rows were prefetched during the previous block)
            j = _weight_of(starts, j, b + r)
            w = ws[j][b + r - starts[j]]
            for k in range(K):
                buf[r, k] = _bf16(w[k])
        # the next block's rows (those in the weight holding its first row) prefetched during this block's calls
        nb = min(b + R, hi - 1)
        jn = _weight_of(starts, i, nb)
        first = (
            (nb - starts[jn]) * K // 32
        )  # its first cache line in that weight (K bf16 per row: K / 32 lines)
        lines = 0 if b + R >= hi else (min(hi, b + 2 * R, starts[jn + 1]) - nb) * K // 32
        groups = (n + NR - 1) // NR
        calls = groups * P
        step = (((lines + calls - 1) // calls) << 16) // K
        for g in range(groups):
            r = g * NR
            for p in range(P):
                _mk6x16(xt, p, buf, r, acc, ws[jn], first + (g * P + p) * lines // calls, step)
                j = i
                for t in range(min(NR, n - r)):
                    j = _weight_of(starts, j, b + r + t)
                    o, col = outs[j], b + r + t - starts[j]
                    for m in range(p * PANEL, min(M, (p + 1) * PANEL)):
                        o[m, col] = acc[t, m - p * PANEL]


@njit(cache=True, error_model="numpy")
def _panel_gate_up_rows(xt, w_gate, w_up, ht, lo, hi, buf, acc):  # rows lo..hi of silu(x Wgᵀ)·(x Wuᵀ) -> ht
    # buf holds gate and up rows interleaved (g_f, u_f, g_f+1, ...): one micro-kernel call gives three pairs, and
    # SwiGLU's product goes straight to ht [P, F, 16], the panels the down projection reads (padding rows: 0)
    P, K = xt.shape[0], xt.shape[1]
    R = buf.shape[0] // 2  # gate/up pairs per block
    for b in range(lo, hi, R):
        n = min(hi, b + R) - b
        for f in range(n):
            for k in range(K):
                buf[2 * f, k] = _bf16(w_gate[b + f, k])
                buf[2 * f + 1, k] = _bf16(w_up[b + f, k])
        # the next block's gate rows prefetched during this block's first half of calls, its up rows the second
        first = min(b + R, hi - 1) * K // 32
        lines = 0 if b + R >= hi else (min(hi, b + 2 * R) - (b + R)) * K // 32
        groups = (2 * n + NR - 1) // NR
        calls = groups * P
        half = max(1, calls // 2)
        step = (((lines + half - 1) // half) << 16) // K
        for g in range(groups):
            f0 = g * NR // 2
            for p in range(P):
                c = g * P + p
                pf = w_gate if c < half else w_up
                _mk6x16(xt, p, buf, 2 * f0, acc, pf, first + (c % half) * lines // half, step)
                for t in range(min(NR // 2, n - f0)):
                    for m in range(PANEL):
                        ht[p, b + f0 + t, m] = _silu(acc[2 * t, m]) * acc[2 * t + 1, m]


@njit(cache=True, inline="always")
def _chunk_rows(total, chunks, multiple):  # rows per work item: total over chunks, rounded up to a multiple
    size = (total + chunks - 1) // chunks
    return size + (multiple - size % multiple) % multiple


@njit(parallel=True, cache=True, nogil=True)
def panel_many(xt, M, ws, outs, starts, chunks, bufs, accs):
    # [P, K, 16] f32 panels of x [M, K], n x [N_i, K] u16 -> n x [M, N_i] f32 (written): q/k/v in one launch, as
    # decode_tiles._gemm_many_bf16; bufs [threads, R, K], accs [threads, 6, 16]: each thread's scratch
    total = starts[-1]
    size = _chunk_rows(total, min(total, chunks), NR)
    for c in prange((total + size - 1) // size):
        t = numba.get_thread_id()
        _panel_rows(xt, M, ws, outs, starts, c * size, min(total, (c + 1) * size), bufs[t], accs[t])


@njit(parallel=True, cache=True, nogil=True)
def panel_swiglu(xt, M, w_gate, w_up, w_down, ht, out, starts, chunks, bufs, bufs_down, accs):
    # decode's SwiGLU for a batched step in one call: gate/up into the panels ht [P, F, 16], then down from them
    # (bufs [threads, R, K] for gate/up's rows, bufs_down [threads, R', F] for down's)
    F = w_gate.shape[0]
    size = _chunk_rows(F, min(F, chunks), NR // 2)
    for c in prange((F + size - 1) // size):
        t = numba.get_thread_id()
        _panel_gate_up_rows(xt, w_gate, w_up, ht, c * size, min(F, (c + 1) * size), bufs[t], accs[t])
    total = w_down.shape[0]
    size2 = _chunk_rows(total, min(total, chunks), NR)
    for c in prange((total + size2 - 1) // size2):
        t = numba.get_thread_id()
        _panel_rows(
            ht, M, (w_down,), (out,), starts, c * size2, min(total, (c + 1) * size2), bufs_down[t], accs[t]
        )


@njit(parallel=True, cache=True, nogil=True)
def panel_gate_up(xt, w_gate, w_up, ht, chunks, bufs, accs):  # gate/up alone, into the panels ht [P, F, 16]
    F = w_gate.shape[0]
    size = _chunk_rows(F, min(F, chunks), NR // 2)
    for c in prange((F + size - 1) // size):
        t = numba.get_thread_id()
        _panel_gate_up_rows(xt, w_gate, w_up, ht, c * size, min(F, (c + 1) * size), bufs[t], accs[t])


def panels(
    x2: np.ndarray,
) -> np.ndarray:  # [M, K] f32 -> [ceil(M / 16), K, 16] f32: x transposed, zero-padded
    M, K = x2.shape
    P = -(-M // PANEL)
    padded = np.zeros((P * PANEL, K), np.float32)
    padded[:M] = x2
    return np.ascontiguousarray(padded.reshape(P, PANEL, K).transpose(0, 2, 1))


def unpanel(ht: np.ndarray, M: int) -> np.ndarray:  # [P, F, 16] -> [M, F]
    P, F, _ = ht.shape
    return np.ascontiguousarray(ht.transpose(0, 2, 1).reshape(P * PANEL, F)[:M])


_scratch = (
    threading.local()
)  # per Python thread: two threads calling the kernels at once never share a buffer


def scratch(K: int) -> tuple[np.ndarray, np.ndarray]:
    """Each worker thread's widened block [R, K] and 6 x 16 sums (R: a multiple of 6 rows within BUF_BYTES)."""
    threads = numba.config.NUMBA_NUM_THREADS  # numba.get_thread_id() < this, whatever set_num_threads chose
    key = (threads, K)
    cached = getattr(_scratch, "buffers", {})
    if key not in cached:
        R = max(NR, BUF_BYTES // (4 * K) // NR * NR)
        cached[key] = (np.zeros((threads, R, K), np.float32), np.zeros((threads, NR, PANEL), np.float32))
        _scratch.buffers = cached
    return cached[key]
