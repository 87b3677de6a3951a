"""Prefill's products with quantized weights ("int8"): the prompt's rows quantized to int8 blocks once, then each
weight row's blocks decoded once and dotted with four tokens at a time — llama.cpp's scheme for a batch.

Decode's row dots (quant.py, `_row_*`) take one weight row and one token: for a prompt of T tokens they would
decode every block of a weight T times (Q4_K: unpack eight 6-bit scales and mins, split 128 bytes into nibbles;
Q6_K: rebuild 6-bit codes from nibbles and 2-bit parts; Q8_0: take the absolute value for `vpmaddubsw`) and
convert each block's fp16 scale T times. A tile takes one weight row and TILE = 4 tokens: the decoded block stays
in registers and only the integer products, the scaling and the four accumulators are per token. The float work
of each (row, token) pair is exactly the row dot's (the same eight lanes, the same fmul/fadd in the same order;
the integer sums are exact either way), so a tile gives the bits four row dots give (tested), and decode and
prefill agree on a token's products.

Where the CPU has AVX-512 none of this runs by default: every format's prefill dequantizes blocks of rows into
prefill_gemm.py's float32 micro-kernel (linear.INT8_PREFILL is empty there; 1.34-1.40x these tiles on Q4_K_M, a
Zen 5). Elsewhere the tiles take Q4_K and Q6_K. The alternative, prefill's earlier road and still "float"'s (and
"int8"'s for the formats linear.INT8_PREFILL does not list: q8_0), widens
blocks of rows to float32 and calls BLAS's sgemm: float32 products of the exact weights, but the widening runs on
one thread between BLAS calls, and BLAS's threads and numba's take turns on the same cores (a thread that spins
waiting holds the core the other needs). The tiles run in numba's threads alone. Measured (AMD EPYC, AVX2, 2 cores
shared with other processes: ratios only; same process, interleaved, best of 3-5; `benchmarks/bench_quant_prefill.py`):

- one thread each, CPU seconds, 128 tokens, Qwen3-0.6B's layer-0 shapes: tiles against widening + sgemm q8_0
  0.68-0.76x, q4_k 0.93-1.08x, q6_k 0.63-0.72x (before Q6_K took x's pair sums from one pass per call; after,
  on random blocks of [1024, 3072]: q6_k 1.08x, q4_k 1.41x); against decode's row dots one token at a time q8_0
  1.0x, q4_k 2.5-2.8x, q6_k 1.7x. Without VNNI the int8 products cost what float32 FMAs do (vpmaddubsw +
  vpmaddwd per 32 values and per token, against four FMAs), so a tile wins where decoding a block costs (the
  k-quants), not on Q8_0.
- a whole 128-token prefill, one thread, CPU seconds: Qwen3-0.6B q8_0 0.71x (44 against 62 tok/s), Q4_K_M
  0.97x; the 2-layer Qwen3-30B-A3B-shaped Q4_K_M 1.31x (its experts get a few tokens each, and the earlier
  prefill dotted them one token per row dot, re-decoding every block).
- the same on both threads, wall clock, while other processes load the machine: q8_0 4.0-5.3x, Q4_K_M 2.4-4.7x,
  the MoE 2.7-3.3x: BLAS's threads lose most of their time to the contention, the tiles little. In that state
  `benchmarks/bench_quant.py` (same run, 128 tokens) had prefill at 1.5x llama.cpp's on q8_0 and 2.4x on Q4_K_M;
  llama.cpp's spinning threads suffer more from the load than numba's, so a quiet machine decides.

The activation's rounding is decode's: x and SwiGLU's hidden h enter as Q8_0 / Q8_K blocks (≤ half a step of
amax/127 per value), so "int8" prefill logits differ from the float32 ones by what decode's differ
(tests/test_numba_quant.py bounds both against the dequantized float32 reference). Against llama.cpp on the same
files (`benchmarks/quant_kl.py`, 64 positions, mean KL in nats): q8_0 8.5e-5 (BLAS prefill 5.4e-5, int8 decode
8.5e-5), Q4_K_M 1.7e-4 (1.4e-4, 1.7e-4) — where feeding the unquantized weights lands at 2.0e-4 and 1.6e-2.

On CPUs without AVX2 the tiles are four calls of quant.py's plain row loops (the same bits).
"""

from __future__ import annotations

import numba
import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.extending import intrinsic

from tinyqwen.backends.numba import avx2, phases, quant
from tinyqwen.backends.numba.avx2 import F32, I8, I16, I32, V8I32, V16I16, V32I8, _add, _Row, _splat_lane16

TILE = 4  # tokens per tile: 4 float accumulators of 8 lanes, plus a decoded block, fit AVX2's 16 registers

# ---- the tiles in LLVM IR: one weight row, rows m..m+3 of the activation's int8 forms ----------------------------


def _token(builder, base, t, width):  # offset base + t·width (the same element of token m + t's row)
    return builder.add(base, builder.mul(ir.Constant(base.type, t), width)) if t else base


def _half(r, i, offset):  # the fp16 at byte `offset` of argument i's row -> float, in integer instructions
    # (r.half's `fpext half` becomes vpinsrw into whatever register LLVM picks, keeping its other lanes: here one
    # of the accumulators, so every block's scale waited for the previous block's sums and q8_0 tiles ran at 0.7x
    # the row dots; a zeroed vector around it was optimised away.) The half is its 11-bit significand (the implicit
    # 1 added for a normal half) times 2^(e − 25) (e = max(exponent, 1)): an exact int -> float conversion times
    # a power of two built from bits, both normal floats, then the sign. Equal to vcvtph2ps for every finite
    # half. (Shifting the half's bits into a float's place and rescaling by 2¹¹² was exact too, but a subnormal
    # half became a subnormal float there, and a multiply with a subnormal input takes a slow microcode path:
    # Q6_K's super-block scales of weights ~0.02 are ~2e-5, subnormal halves, and the 2-layer Qwen3-30B-A3B-shaped
    # Q4_K_M's Q6_K expert down tiles ran at 0.45x the Q4_K ones, 69 ms against 31 for the same work; after, 35 ms: one thread, CPU time.)
    b = r.b

    def c(v):
        return ir.Constant(I32, v)

    h = b.zext(r.load(i, offset, I16), I32)
    exponent = b.and_(b.lshr(h, c(10)), c(0x1F))
    normal = b.icmp_unsigned("!=", exponent, c(0))
    significand = b.or_(b.and_(h, c(0x3FF)), b.select(normal, c(0x400), c(0)))
    power = b.bitcast(b.shl(b.add(b.select(normal, exponent, c(1)), c(127 - 25)), c(23)), F32)
    value = b.bitcast(b.fmul(b.sitofp(significand, F32), power), I32)
    sign = b.shl(b.and_(h, c(0x8000)), c(16))
    return b.bitcast(b.or_(value, sign), F32)


def _tuple(context, builder, sig, r, accs):  # the four accumulators' ordered sums as a UniTuple(float32, 4)
    return context.make_tuple(builder, sig.return_type, [r.total(acc) for acc in accs])


_OUT = types.UniTuple(types.float32, TILE)


@intrinsic
def q8_0_tile(typingctx, b, xq, xd, n, m):
    """Row n of a Q8_0 weight b [N, K/32·34] · rows m..m+3 of x as Q8_0 (codes xq [M, K], scales xd [M, K/32]) ->
    4 x float32, each equal to avx2.q8_0_row's. Per block: |w| once (vpsignb), then per token its sign moved
    onto x, vpmaddubsw, vpmaddwd into eight int32 lanes, scaled by d_w·d_x into that token's float lanes."""

    def codegen(context, builder, sig, args):
        r = _Row(context, builder, sig, args, {0: 3, 1: 4, 2: 4})
        op = r.op
        accs = [r.new_acc() for _ in range(TILE)]
        ones = ir.Constant(V16I16, [1] * 16)
        K, nb = r.length(1), r.length(2)
        with r.loop(nb) as loop:
            blk = loop.index
            o = builder.mul(blk, ir.Constant(blk.type, 34))
            w = r.load(0, _add(builder, o, 2), V32I8)
            aw = builder.call(op.sign, [w, w])
            dw = _half(r, 0, o)
            x0 = builder.mul(blk, ir.Constant(blk.type, 32))
            for t in range(TILE):
                x = r.load(1, _token(builder, x0, t, K), V32I8)
                pairs = builder.call(op.maddubs, [aw, builder.call(op.sign, [x, w])])
                lanes = builder.call(op.maddwd, [pairs, ones])
                scale = builder.fmul(dw, r.load(2, _token(builder, blk, t, nb), F32, 4))
                r.scaled_add(accs[t], lanes, scale)
        return _tuple(context, builder, sig, r, accs)

    return _OUT(b, xq, xd, n, m), codegen


def _q4_k_tile_of(T: int):  # the Q4_K tile over T tokens (4: q4_k_tile; 8: q4_k_tile8)
    @intrinsic
    def tile(typingctx, b, xq, xd, xs, n, m):
        """Row n of a Q4_K weight b [N, K/256·144] · rows m..m+T-1 of x as Q8_K (codes xq [M, K], scales xd
        [M, K/256], sums of 32 xs [M, K/32] int32) -> T x float32, each equal to avx2.q4_k_row's. Per block the
        scales and mins are unpacked and each group's 32 bytes split into nibbles once, then used for the T
        tokens."""

        def codegen(context, builder, sig, args):
            r = _Row(context, builder, sig, args, {0: 4, 1: 5, 2: 5, 3: 5})
            op = r.op
            accs = [r.new_acc() for _ in range(T)]
            K, nb, ns = r.length(1), r.length(2), r.length(3)
            V4I32 = ir.VectorType(I32, 4)

            def c32(v):
                return ir.Constant(I32, v)

            with r.loop(nb) as loop:
                blk = loop.index
                o = builder.mul(blk, ir.Constant(blk.type, 144))
                w0, w1, w2 = (r.load(0, _add(builder, o, 4 + 4 * k), I32) for k in range(3))
                low6, low4, top2 = c32(0x3F3F3F3F), c32(0x0F0F0F0F), c32(0x03030303)
                sc_lo = builder.and_(w0, low6)
                sc_hi = builder.or_(
                    builder.and_(w2, low4), builder.shl(builder.and_(builder.lshr(w0, c32(6)), top2), c32(4))
                )
                mn_lo = builder.and_(w1, low6)
                mn_hi = builder.or_(
                    builder.and_(builder.lshr(w2, c32(4)), low4),
                    builder.shl(builder.and_(builder.lshr(w1, c32(6)), top2), c32(4)),
                )
                words = ir.Constant(V4I32, None)
                for k, v in enumerate((sc_lo, sc_hi, mn_lo, mn_hi)):
                    words = builder.insert_element(words, v, c32(k))
                both = builder.zext(
                    builder.bitcast(words, ir.VectorType(I8, 16)), V16I16
                )  # scales 0-7, mins 8-15
                x0 = builder.mul(blk, ir.Constant(blk.type, 256))
                dots = [ir.Constant(V8I32, [0] * 8)] * T
                for g in range(4):
                    codes = r.load(0, _add(builder, o, 16 + 32 * g), V32I8)
                    for half, nib in (
                        (0, builder.and_(codes, op.const8(15))),
                        (1, builder.lshr(codes, op.const8(4))),
                    ):
                        scale = _splat_lane16(builder, both, 2 * g + half)
                        xo = _add(builder, x0, 64 * g + 32 * half)
                        for t in range(T):
                            pairs = builder.call(
                                op.maddubs, [nib, r.load(1, _token(builder, xo, t, K), V32I8)]
                            )
                            dots[t] = builder.add(dots[t], builder.call(op.maddwd, [pairs, scale]))
                mins = builder.zext(
                    builder.shuffle_vector(
                        both,
                        ir.Constant(V16I16, None),
                        ir.Constant(ir.VectorType(I32, 8), list(range(8, 16))),
                    ),
                    V8I32,
                )
                d, dmin = _half(r, 0, o), _half(r, 0, _add(builder, o, 2))
                s0 = builder.mul(blk, ir.Constant(blk.type, 8))
                for t in range(T):
                    min_lanes = builder.mul(mins, r.load(3, _token(builder, s0, t, ns), V8I32))
                    xdb = r.load(2, _token(builder, blk, t, nb), F32, 4)
                    r.scaled_add(accs[t], dots[t], builder.fmul(d, xdb))
                    r.scaled_add(accs[t], min_lanes, builder.fmul(dmin, xdb), sub=True)
            return _tuple(context, builder, sig, r, accs)

        return types.UniTuple(types.float32, T)(b, xq, xd, xs, n, m), codegen

    return tile


q4_k_tile = _q4_k_tile_of(TILE)
q4_k_tile8 = _q4_k_tile_of(2 * TILE)


def _q6_k_tile_of(T: int):  # the Q6_K tile over T tokens (4: q6_k_tile; 8: q6_k_tile8)
    @intrinsic
    def tile(typingctx, b, xq, xd, xp, n, m):
        """Row n of a Q6_K weight b [N, K/256·210] · rows m..m+T-1 of x as Q8_K (codes xq [M, K], scales xd [M, K/256],
        32·(x₂ⱼ + x₂ⱼ₊₁) xp [M, K/2] int16) -> T x float32, each equal to avx2.q6_k_row's. Per run of 32 the 6-bit
        codes and the scale pair are rebuilt once, then used for the T tokens; the −32 of the codes is taken off as
        x's pair sums times 32 (what vpmaddubsw(32, x) gives, computed once per call instead of per row)."""

        def codegen(context, builder, sig, args):
            r = _Row(context, builder, sig, args, {0: 4, 1: 5, 2: 5, 3: 5})
            op = r.op
            accs = [r.new_acc() for _ in range(T)]
            K, nb, K2 = r.length(1), r.length(2), r.length(3)
            with r.loop(nb) as loop:
                blk = loop.index
                o = builder.mul(blk, ir.Constant(blk.type, 210))
                x0 = builder.mul(blk, ir.Constant(blk.type, 256))
                scales = builder.sext(r.load(0, _add(builder, o, 192), ir.VectorType(I8, 16)), V16I16)
                dots = [ir.Constant(V8I32, [0] * 8)] * T
                for h in range(2):
                    low = [r.load(0, _add(builder, o, 64 * h + 32 * k), V32I8) for k in range(2)]
                    high = r.load(0, _add(builder, o, 128 + 32 * h), V32I8)
                    for run in range(4):
                        nib = low[run % 2] if run < 2 else builder.lshr(low[run % 2], op.const8(4))
                        nib = builder.and_(nib, op.const8(15))
                        top = builder.and_(builder.lshr(high, op.const8(2 * run)), op.const8(3))
                        q = builder.or_(nib, builder.shl(top, op.const8(4)))  # 0..63
                        s = 8 * h + 2 * run  # values 0-15 take scale s, 16-31 scale s + 1
                        sc = builder.shuffle_vector(
                            scales,
                            ir.Constant(V16I16, None),
                            ir.Constant(ir.VectorType(I32, 16), [s] * 8 + [s + 1] * 8),
                        )
                        xo = _add(builder, x0, 128 * h + 32 * run)
                        half_o = builder.udiv(xo, ir.Constant(xo.type, 2))
                        for t in range(T):
                            x = r.load(1, _token(builder, xo, t, K), V32I8)
                            x32 = r.load(3, _token(builder, half_o, t, K2), V16I16)
                            pairs = builder.sub(builder.call(op.maddubs, [q, x]), x32)
                            dots[t] = builder.add(dots[t], builder.call(op.maddwd, [pairs, sc]))
                d = _half(r, 0, _add(builder, o, 208))
                for t in range(T):
                    r.scaled_add(
                        accs[t], dots[t], builder.fmul(d, r.load(2, _token(builder, blk, t, nb), F32, 4))
                    )
            return _tuple(context, builder, sig, r, accs)

        return types.UniTuple(types.float32, T)(b, xq, xd, xp, n, m), codegen

    return tile


q6_k_tile = _q6_k_tile_of(TILE)
q6_k_tile8 = _q6_k_tile_of(2 * TILE)


# ---- the same tiles as four row dots (CPUs without AVX2: quant.py's plain loops, the same bits) ----------------


@njit(cache=True, error_model="numpy")
def _q8_0_tile_loops(w, w8, n, a, ad, m, acc):
    return (
        quant._row_q8_0_loops(w, w8, n, a, ad, m, acc),
        quant._row_q8_0_loops(w, w8, n, a, ad, m + 1, acc),
        quant._row_q8_0_loops(w, w8, n, a, ad, m + 2, acc),
        quant._row_q8_0_loops(w, w8, n, a, ad, m + 3, acc),
    )


@njit(cache=True, error_model="numpy")
def _q4_k_tile_loops(w, n, a, ad, asum, m, acc):
    return (
        quant._row_q4_k_loops(w, n, a, ad, asum, m, acc),
        quant._row_q4_k_loops(w, n, a, ad, asum, m + 1, acc),
        quant._row_q4_k_loops(w, n, a, ad, asum, m + 2, acc),
        quant._row_q4_k_loops(w, n, a, ad, asum, m + 3, acc),
    )


@njit(cache=True, error_model="numpy")
def _q6_k_tile_loops(w, w8, n, a, ad, ap, m, acc):
    return (
        quant._row_q6_k_loops(w, w8, n, a, ad, m, acc),
        quant._row_q6_k_loops(w, w8, n, a, ad, m + 1, acc),
        quant._row_q6_k_loops(w, w8, n, a, ad, m + 2, acc),
        quant._row_q6_k_loops(w, w8, n, a, ad, m + 3, acc),
    )


@njit(cache=True, error_model="numpy", inline="always")
def _q8_0_tile_avx2(w, w8, n, a, ad, m, acc):
    return q8_0_tile(w, a, ad, n, m)


@njit(cache=True, error_model="numpy", inline="always")
def _q4_k_tile_avx2(w, n, a, ad, asum, m, acc):
    return q4_k_tile(w, a, ad, asum, n, m)


@njit(cache=True, error_model="numpy", inline="always")
def _q4_k_tile8_avx2(w, n, a, ad, asum, m, acc):
    return q4_k_tile8(w, a, ad, asum, n, m)


@njit(cache=True, error_model="numpy")
def _q4_k_tile8_loops(w, n, a, ad, asum, m, acc):
    return _q4_k_tile_loops(w, n, a, ad, asum, m, acc) + _q4_k_tile_loops(w, n, a, ad, asum, m + 4, acc)


@njit(cache=True, error_model="numpy", inline="always")
def _q6_k_tile8_avx2(w, w8, n, a, ad, ap, m, acc):
    return q6_k_tile8(w, a, ad, ap, n, m)


@njit(cache=True, error_model="numpy")
def _q6_k_tile8_loops(w, w8, n, a, ad, ap, m, acc):
    return _q6_k_tile_loops(w, w8, n, a, ad, ap, m, acc) + _q6_k_tile_loops(w, w8, n, a, ad, ap, m + 4, acc)


@njit(cache=True, error_model="numpy", inline="always")
def _q6_k_tile_avx2(w, w8, n, a, ad, ap, m, acc):
    return q6_k_tile(w, a, ad, ap, n, m)


if avx2.HAS_AVX2:
    _q8_0_tile, _q4_k_tile, _q6_k_tile = _q8_0_tile_avx2, _q4_k_tile_avx2, _q6_k_tile_avx2
    _q4_k_tile8, _q6_k_tile8 = _q4_k_tile8_avx2, _q6_k_tile8_avx2
else:
    _q8_0_tile, _q4_k_tile, _q6_k_tile = _q8_0_tile_loops, _q4_k_tile_loops, _q6_k_tile_loops
    _q4_k_tile8, _q6_k_tile8 = _q4_k_tile8_loops, _q6_k_tile8_loops

# Q4_K / Q6_K rows dotted with 8 tokens at a time where 8 remain (q4_k_tile8, q6_k_tile8), else 4: the block's decoding (scales and
# mins unpacked, nibbles split, fp16 scales) shared by twice the tokens; the same float work per token, so the
# same bits. One thread, CPU seconds (a busy machine): the MoE experts of 30B-A3B's shapes (random Q4_K stacks,
# 128 tokens, top-8) 84, 84 ms against 94, 100 without; the 2-layer 30B-A3B-shaped Q4_K_M's whole 128-token
# prefill 273 ms against 297, its attention products 59 against 69 (Q4_K alone); Q6_K's expert down 33.0, 32.1 ms
# against 35.7, 34.7. False: 4 at a time everywhere
TILE8 = True


@njit(cache=True, error_model="numpy", inline="always")
def _five(acts):  # the forms decode's row dots read (all but the pair sums)
    return acts[0], acts[1], acts[2], acts[3], acts[4]


@njit(cache=True, error_model="numpy", inline="always")
def _tile8(
    kind, w, w8, n, acts, m, acc
):  # row n of a Q4_K / Q6_K w · rows m..m+7 of x's Q8_K forms -> 8 x f32
    a0q, a0d, akq, akd, aks, akp = acts
    if kind == quant.Q4_K:
        return _q4_k_tile8(w, n, akq, akd, aks, m, acc)
    return _q6_k_tile8(w, w8, n, akq, akd, akp, m, acc)


@njit(cache=True, error_model="numpy", inline="always")
def _tile(kind, w, w8, n, acts, m, acc):  # row n of w · rows m..m+3 of x's int8 forms -> 4 x float32
    a0q, a0d, akq, akd, aks, akp = acts
    if kind == quant.Q8_0:
        return _q8_0_tile(w, w8, n, a0q, a0d, m, acc)
    if kind == quant.Q4_K:
        return _q4_k_tile(w, n, akq, akd, aks, m, acc)
    return _q6_k_tile(w, w8, n, akq, akd, akp, m, acc)


# ---- the product: weight rows over the threads, tokens in tiles -------------------------------------------------

# tokens per pass over a chunk of weight rows: their int8 rows (64 KB at K = 1024) stay in L2
TOKEN_BLOCK = 64


@njit(cache=True, error_model="numpy")
def _matmul_rows(kind, w, w8, acts, out, lo, hi):  # weight rows lo..hi for every token -> out[:, lo:hi]
    M = out.shape[0]
    acc = np.empty(8, np.float32)  # (the plain loops' lanes)
    for m0 in range(0, M, TOKEN_BLOCK):
        m1 = min(M, m0 + TOKEN_BLOCK)
        for n in range(lo, hi):  # the row's blocks stay in L1 while the block's tokens pass
            m = m0
            if kind != quant.Q8_0 and TILE8:
                while m + 2 * TILE <= m1:
                    v8 = _tile8(kind, w, w8, n, acts, m, acc)
                    for t in range(2 * TILE):
                        out[m + t, n] = v8[t]
                    m += 2 * TILE
            while m + TILE <= m1:
                v = _tile(kind, w, w8, n, acts, m, acc)
                out[m, n], out[m + 1, n], out[m + 2, n], out[m + 3, n] = v
                m += TILE
            while m < m1:  # the last few tokens: decode's row dot
                out[m, n] = quant._row(kind, w, w8, n, _five(acts), m, acc)
                m += 1


@njit(cache=True, error_model="numpy")
def _quantize_rows(x, need0, needk, acts, lo, hi):  # rows lo..hi of x into its int8 forms (acts, written)
    a0q, a0d, akq, akd, aks, akp = acts
    if need0:
        quant.quantize_q8_0_rows(x[lo:hi], a0q[lo:hi], a0d[lo:hi])
    if needk:
        quant.quantize_q8_k_rows(x[lo:hi], akq[lo:hi], akd[lo:hi], aks[lo:hi])
        for m in range(lo, hi):  # Q6_K's −32: 32·(x₂ⱼ + x₂ⱼ₊₁), as vpmaddubsw(32, x) would give it
            for j in range(akp.shape[1]):
                akp[m, j] = np.int16(32) * (np.int16(akq[m, 2 * j]) + np.int16(akq[m, 2 * j + 1]))


@njit(parallel=True, cache=True, nogil=True)
def quantize_acts(x, need0, needk, chunks):  # x [M, K] -> x's int8 forms, the rows over the threads
    # quant._quantize_acts's (Q8_0 codes, scales; Q8_K codes, scales, sums of 32) and Q8_K's pair sums ×32 [M, K/2]
    # int16 for the Q6_K tile; as needed (empty otherwise). A prompt's rows are many: 128 x 3072 values for down
    M, K = x.shape
    acts = (
        np.empty((M, K if need0 else 0), np.int8),
        np.empty((M, K // 32 if need0 else 0), np.float32),
        np.empty((M, K if needk else 0), np.int8),
        np.empty((M, K // 256 if needk else 0), np.float32),
        np.empty((M, K // 32 if needk else 0), np.int32),
        np.empty((M, K // 2 if needk else 0), np.int16),
    )
    c = min(M, chunks)
    size = (M + c - 1) // c
    for i in prange(c):
        _quantize_rows(x, need0, needk, acts, i * size, min(M, (i + 1) * size))
    return acts


def matmul(x2: np.ndarray, w, chunks: int) -> np.ndarray:
    """x2 [M, K] float32 · a QuantWeight [N, K]ᵀ -> [M, N] float32: x2 quantized to int8 blocks (Q8_0 for a q8_0
    weight, Q8_K for the k-quants), then the tiles over the threads (chunks of weight rows)."""
    return matmul_many(x2, (w,), chunks)[0]


@njit(parallel=True, cache=True, nogil=True)
def _matmul_region(kinds, ws, ws8, x, need0, needk, acts, outs, qchunks, jobs, workers):
    # ONE parallel region for x's quantization and then the products of several weights with it: phase 0, chunks
    # of x's rows quantized (acts written); phase 1, once all are, jobs [J, 3] (weight k, its rows lo..hi) -> outs
    # [k] [M, N_k]. Every chunk and job claimed in turn by the threads (phases.py): the same work, the same bits,
    # as quantize_acts and then _matmul per weight, with one fork and join instead of two per weight
    M = x.shape[0]
    qsize = (M + qchunks - 1) // qchunks
    ctr = np.zeros(4 * phases.LINE, np.int64)  # (phases.counters(2))
    for _ in prange(workers):
        i = phases.claim(ctr, 0)
        while i < qchunks:
            _quantize_rows(x, need0, needk, acts, i * qsize, min(M, (i + 1) * qsize))
            phases.finish(ctr, 0)
            i = phases.claim(ctr, 0)
        phases.wait_finished(ctr, 0, qchunks)
        i = phases.claim(ctr, 1)
        while i < jobs.shape[0]:
            k = jobs[i, 0]
            _matmul_rows(kinds[k], ws[k], ws8[k], acts, outs[k], jobs[i, 1], jobs[i, 2])
            i = phases.claim(ctr, 1)


def _acts(M: int, K: int, need0: bool, needk: bool) -> tuple:  # quantize_acts' arrays, unwritten
    return (
        np.empty((M, K if need0 else 0), np.int8),
        np.empty((M, K // 32 if need0 else 0), np.float32),
        np.empty((M, K if needk else 0), np.int8),
        np.empty((M, K // 256 if needk else 0), np.float32),
        np.empty((M, K // 32 if needk else 0), np.int32),
        np.empty((M, K // 2 if needk else 0), np.int16),
    )


def matmul_many(x2: np.ndarray, ws: tuple, chunks: int) -> tuple:
    """x2 [M, K] float32 · each QuantWeight [N_k, K]ᵀ of ws -> a tuple of [M, N_k] float32: x2 quantized once (the
    int8 forms every weight's format reads), then every weight's rows in `chunks` chunks, all in one parallel
    region. Prefill's q/k/v and gate/up products: under load each parallel launch waits for both threads to be
    scheduled, and a 128-token prefill of Qwen3-0.6B launched ~400 (a quantization and a product per weight)."""
    M, K = x2.shape
    need0, needk = quant._needs({w.kind for w in ws})
    outs = tuple(np.empty((M, w.shape[0]), np.float32) for w in ws)
    rows = np.array([w.shape[0] for w in ws], np.int64)
    size = max(1, -(-int(rows.sum()) // chunks))
    n = -(-rows // size)
    k = np.repeat(np.arange(len(ws)), n)
    lo = (np.arange(n.sum()) - np.repeat(np.cumsum(n) - n, n)) * size
    jobs = np.stack((k, lo, np.minimum(rows[k], lo + size)), axis=1).astype(np.int64)
    # one Numba type for the tuple (indexed at run time): the weights all read-only file maps, or all writable
    if len({w.data.flags.writeable for w in ws}) != 1:
        return tuple(matmul_many(x2, (w,), chunks)[0] for w in ws)
    kinds = np.array([w.kind for w in ws], np.int64)
    workers = numba.get_num_threads()
    _matmul_region(
        kinds, tuple(w.data for w in ws), tuple(w.data8 for w in ws), np.ascontiguousarray(x2, np.float32),
        need0, needk, _acts(M, K, need0, needk), outs, min(M, chunks), jobs, workers,
    )  # fmt: skip
    return outs


@njit(cache=True, error_model="numpy")
def tile_values(kind, w, w8, acts):  # every row of w · tokens 0..3 through the tile alone -> [N, 4] (tests)
    out = np.empty((w.shape[0], TILE), np.float32)
    acc = np.empty(8, np.float32)
    for n in range(w.shape[0]):
        v = _tile(kind, w, w8, n, acts, 0, acc)
        for t in range(TILE):
            out[n, t] = v[t]
    return out
