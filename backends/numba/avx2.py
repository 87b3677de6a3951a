"""Integer dot products of one quantized block with an int8 activation block on AVX2, through LLVM's x86 intrinsics
(`vpmaddubsw`, `vpmaddwd`, `vpsignb`): the inner loops of quant.py's "int8" GEMVs, as llama.cpp's AVX2 kernels take
them. Used only where the CPU has AVX2 (`HAS_AVX2`, the host's features as LLVM names them); elsewhere quant.py
keeps its plain loops, which give the same integers.

The two instructions that do the work, on 256-bit registers:
    vpmaddubsw(a u8 x32, b s8 x32) -> s16 x16: a[2i]·b[2i] + a[2i+1]·b[2i+1]  (unsigned × signed, pairs summed)
    vpmaddwd(a s16 x16, b s16 x16) -> s32 x8: the same one level up
so 32 products per instruction, summed pairwise, then weighted by the sub-block's scale in the second (b = the
scale in every lane) and accumulated in eight int32 lanes, added across once per block. Every bound fits: a 4-bit
code × an int8 pair ≤ 2·15·127 (Q4_K), a 6-bit one ≤ 2·63·127 < 2¹⁵ (Q6_K), Q8_0's |w| ≤ 128 pairs ≤ 2·128·127
(`vpsignb` moves w's sign onto x, so the unsigned operand is |w|). The sums are exact: equal to the loops'.

Each function is one intrinsic, its body written out in LLVM IR by Python loops (no loop at run time).
"""

from __future__ import annotations

from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

from tinyqwen.backends.numba.settings import _host_features

HAS_AVX2 = "+avx2" in _host_features()

I8, I16, I32 = ir.IntType(8), ir.IntType(16), ir.IntType(32)
V32I8, V16I16, V8I32 = ir.VectorType(I8, 32), ir.VectorType(I16, 16), ir.VectorType(I32, 8)


def _fn(builder, name: str, ret, *args):
    return cgutils.get_or_insert_function(builder.module, ir.FunctionType(ret, list(args)), name)


class _Ops:  # the few instructions the kernels need, on one IR builder
    def __init__(self, context, builder):
        self.context, self.b = context, builder
        self.maddubs = _fn(builder, "llvm.x86.avx2.pmadd.ub.sw", V16I16, V32I8, V32I8)
        self.maddwd = _fn(builder, "llvm.x86.avx2.pmadd.wd", V8I32, V16I16, V16I16)
        self.sign = _fn(builder, "llvm.x86.avx2.psign.b", V32I8, V32I8, V32I8)
        self.reduce = _fn(builder, "llvm.vector.reduce.add.v8i32", I32, V8I32)

    def load32(
        self, arrtype, arr, offset
    ):  # the 32 bytes at arr[offset] (1-D uint8 or int8 array) as <32 x i8>
        data = self.context.make_array(arrtype)(self.context, self.b, arr).data
        ptr = self.b.bitcast(self.b.gep(data, [offset]), V32I8.as_pointer())
        return self.b.load(ptr, align=1)

    def add(self, offset, n):  # offset + n (i64)
        return self.b.add(offset, ir.Constant(offset.type, n))

    def splat16(self, value):  # an int32 value -> <16 x i16>, every lane
        v = self.b.insert_element(ir.Constant(V16I16, None), self.b.trunc(value, I16), ir.Constant(I32, 0))
        return self.b.shuffle_vector(
            v, ir.Constant(V16I16, None), ir.Constant(ir.VectorType(I32, 16), [0] * 16)
        )

    def halves16(self, lo, hi):  # two int32 values -> <16 x i16>: lanes 0-7 lo, 8-15 hi (values 0-15, 16-31)
        a, b = self.splat16(lo), self.splat16(hi)
        return self.b.shuffle_vector(
            a, b, ir.Constant(ir.VectorType(I32, 16), list(range(8)) + list(range(24, 32)))
        )

    def const8(self, n):
        return ir.Constant(V32I8, [n] * 32)


@intrinsic
def q8_0_dot32(typingctx, w8, wo, xq, xo):
    """Σ_{j<32} w8[wo + j] · xq[xo + j] (int8 × int8, exact) -> int32."""

    def codegen(context, builder, sig, args):
        op = _Ops(context, builder)
        w = op.load32(sig.args[0], args[0], args[1])
        x = op.load32(sig.args[2], args[2], args[3])
        pairs = builder.call(op.maddubs, [builder.call(op.sign, [w, w]), builder.call(op.sign, [x, w])])
        ones = ir.Constant(V16I16, [1] * 16)
        return builder.call(op.reduce, [builder.call(op.maddwd, [pairs, ones])])

    return types.int32(w8, wo, xq, xo), codegen


@intrinsic
def q4_k_dot256(typingctx, b, qo, xq, xo, s0, s1, s2, s3, s4, s5, s6, s7):
    """One Q4_K block's Σ_s sc_s · Σ q·x -> int32: 128 bytes of nibbles at b[qo], x's 256 int8 codes at xq[xo],
    the eight 6-bit scales s0..s7 (int32, decoded by the caller). Byte l of group g holds value 64g + l in its low
    nibble (scale 2g) and value 64g + 32 + l in its high one (scale 2g + 1)."""

    def codegen(context, builder, sig, args):
        op = _Ops(context, builder)
        arr_t, x_t = sig.args[0], sig.args[2]
        acc = ir.Constant(V8I32, [0] * 8)
        for g in range(4):
            codes = op.load32(arr_t, args[0], op.add(args[1], 32 * g))
            lo = builder.and_(codes, op.const8(15))
            hi = builder.lshr(codes, op.const8(4))
            for half, nib in ((0, lo), (1, hi)):
                x = op.load32(x_t, args[2], op.add(args[3], 64 * g + 32 * half))
                pairs = builder.call(op.maddubs, [nib, x])
                acc = builder.add(acc, builder.call(op.maddwd, [pairs, op.splat16(args[4 + 2 * g + half])]))
        return builder.call(op.reduce, [acc])

    sig = types.int32(b, qo, xq, xo, s0, s1, s2, s3, s4, s5, s6, s7)
    return sig, codegen


@intrinsic
def q6_k_dot256(typingctx, b, i8, o, xq, xo):
    """One Q6_K block's Σ_s sc_s · Σ (q − 32)·x -> int32: the block at b[o] (i8: the same bytes as int8, for its
    16 signed scales), x's 256 int8 codes at xq[xo]. Each half of 128 values: 64 bytes of low nibbles (ql), 32 of
    2-bit high parts (qh), 8 scales; value l (of 32) of run r takes ql[l + 32·(r%2)]'s nibble r//2 and qh[l]'s
    bits 2r, 2r+1; scales sc[2r] for l < 16, sc[2r + 1] beyond."""

    def codegen(context, builder, sig, args):
        op = _Ops(context, builder)
        b_t, i8_t, x_t = sig.args[0], sig.args[1], sig.args[3]
        data8 = context.make_array(i8_t)(context, builder, args[1]).data
        acc = ir.Constant(V8I32, [0] * 8)
        for h in range(2):
            low = [op.load32(b_t, args[0], op.add(args[2], 64 * h + 32 * k)) for k in range(2)]
            high = op.load32(b_t, args[0], op.add(args[2], 128 + 32 * h))
            for r in range(4):
                nib = low[r % 2] if r < 2 else builder.lshr(low[r % 2], op.const8(4))
                nib = builder.and_(nib, op.const8(15))
                top = builder.and_(builder.lshr(high, op.const8(2 * r)), op.const8(3))
                q = builder.or_(nib, builder.shl(top, op.const8(4)))  # 0..63
                x = op.load32(x_t, args[3], op.add(args[4], 128 * h + 32 * r))
                # (q − 32)·x pairs, exact in int16: maddubs(q, x) − maddubs(32, x)
                pairs = builder.sub(
                    builder.call(op.maddubs, [q, x]), builder.call(op.maddubs, [op.const8(32), x])
                )
                scales = [
                    builder.sext(
                        builder.load(builder.gep(data8, [op.add(args[2], 192 + 8 * h + 2 * r + k)])), I32
                    )
                    for k in range(2)
                ]
                acc = builder.add(acc, builder.call(op.maddwd, [pairs, op.halves16(*scales)]))
        return builder.call(op.reduce, [acc])

    return types.int32(b, i8, o, xq, xo), codegen


# ---- whole rows: the block loop itself in IR, the sums kept in vector registers ---------------------------------
#
# The block intrinsics above return one int32 per block, so each block paid a horizontal add (and Q8_0, a block per
# 32 values, paid it 32 times a row of 1024) plus a scalar float multiply-add. The row intrinsics below run the loop
# over a row's blocks in IR and keep eight float32 lanes across it: lane i of a block's integer sum holds the
# products of values 4i..4i+3 of each run of 32 (what `vpmaddwd` leaves there), is converted to float once per
# block, scaled by the block's d·d_x and added to lane i of the accumulator; one ordered sum of the eight lanes at
# the end. No fast-math flags: plain fmul/fadd in a fixed order, so quant.py's plain loops (`_row_*_loops`), doing
# the same operations on the same lanes, give the same bits.

F32 = ir.FloatType()
V8F32 = ir.VectorType(F32, 8)


class _Row:  # the arrays of a row kernel, as pointers to the rows read, and what every row kernel needs
    # The arrays arrive whole (2-D, C-contiguous) with the index of the row read, not as row views (w[n]): a view
    # made per row cost atomic reference-count updates on the weight's count, which the threads share, so its
    # cache line bounced between the cores (a GEMV over views ran at 0.4x a plain loop, even on one thread)
    def __init__(self, context, builder, sig, args, rows):  # rows: {array argument: the argument of its row}
        self.context, self.b = context, builder
        self.op = _Ops(context, builder)
        self.arrays, self.base = {}, {}
        for i, r in rows.items():  # row r of a C-contiguous 2-D array starts at element r·shape[1]
            self.arrays[i] = context.make_array(sig.args[i])(context, builder, args[i])
            width = cgutils.unpack_tuple(builder, self.arrays[i].shape, 2)[1]
            self.base[i] = builder.mul(args[r], width)
        self.fadd = _fn(builder, "llvm.vector.reduce.fadd.v8f32", F32, F32, V8F32)

    def ptr(self, i, offset, to):  # pointer to element `offset` of argument i's row, as a pointer to `to`
        p = self.b.gep(self.arrays[i].data, [self.b.add(self.base[i], offset)])
        return self.b.bitcast(p, to.as_pointer())

    def load(self, i, offset, to, align=1):
        return self.b.load(self.ptr(i, offset, to), align=align)

    def half(self, i, offset):  # the fp16 at byte `offset` of argument i -> float
        h = self.b.bitcast(self.load(i, offset, I16), ir.HalfType())
        return self.b.fpext(h, F32)

    def length(self, i):  # shape[1] of argument i (i64): the blocks of a row
        return cgutils.unpack_tuple(self.b, self.arrays[i].shape, 2)[1]

    def splatf(self, value):  # float -> <8 x float>
        v = self.b.insert_element(ir.Constant(V8F32, None), value, ir.Constant(I32, 0))
        return self.b.shuffle_vector(v, ir.Constant(V8F32, None), ir.Constant(ir.VectorType(I32, 8), [0] * 8))

    def scaled_add(self, acc_ptr, lanes, scale, sub=False):  # acc = acc ± float(lanes)·scale (lane-wise)
        b = self.b
        term = b.fmul(b.sitofp(lanes, V8F32), self.splatf(scale))
        acc = b.load(acc_ptr)
        b.store(b.fsub(acc, term) if sub else b.fadd(acc, term), acc_ptr)

    def loop(self, n):
        return cgutils.for_range(self.b, n)

    def new_acc(self):
        acc = cgutils.alloca_once(self.b, V8F32)
        self.b.store(ir.Constant(V8F32, [0.0] * 8), acc)
        return acc

    def total(self, acc_ptr):  # ((0 + lane 0) + lane 1) + ... + lane 7: ordered, as the loops do it
        return self.b.call(self.fadd, [ir.Constant(F32, 0.0), self.b.load(acc_ptr)])


def _add(builder, offset, n):
    return builder.add(offset, ir.Constant(offset.type, n))


@intrinsic
def q8_0_row(typingctx, b, xq, xd, n, m):
    """Row n of a Q8_0 weight b [N, K/32·34] uint8 · row m of x as Q8_0 (codes xq [M, K] int8, scales xd
    [M, K/32] f32) -> float32. Per block: 32 int8 products in eight int32 lanes (vpsignb, vpmaddubsw, vpmaddwd), scaled by
    d_w·d_x into the eight float lanes."""

    def codegen(context, builder, sig, args):
        r = _Row(context, builder, sig, args, {0: 3, 1: 4, 2: 4})
        op, acc = r.op, r.new_acc()
        ones = ir.Constant(V16I16, [1] * 16)
        with r.loop(r.length(2)) as loop:
            blk = loop.index
            o = builder.mul(blk, ir.Constant(blk.type, 34))
            w = r.load(0, _add(builder, o, 2), V32I8)
            x = r.load(1, builder.mul(blk, ir.Constant(blk.type, 32)), V32I8)
            pairs = builder.call(op.maddubs, [builder.call(op.sign, [w, w]), builder.call(op.sign, [x, w])])
            lanes = builder.call(op.maddwd, [pairs, ones])
            scale = builder.fmul(r.half(0, o), r.load(2, blk, F32, 4))
            r.scaled_add(acc, lanes, scale)
        return r.total(acc)

    return types.float32(b, xq, xd, n, m), codegen


def _splat_lane16(builder, vec, lane):  # lane `lane` of a <16 x i16> in every lane
    return builder.shuffle_vector(
        vec, ir.Constant(V16I16, None), ir.Constant(ir.VectorType(I32, 16), [lane] * 16)
    )


@intrinsic
def q4_k_row(typingctx, b, xq, xd, xs, n, m):
    """Row n of a Q4_K weight b [N, K/256·144] · row m of x as Q8_K (codes xq [M, K], scales xd [M, K/256], sums
    of 32 xs [M, K/32] int32) -> float32. Per block: the eight 6-bit scales and mins unpacked at once from their 12 bytes
    (three 32-bit words, a few shifts and masks: bytes 0-3 of each word are four of them), the nibble products
    weighted by their scale in eight int32 lanes; the mins' term m_s·Σx_s (lane s) from x's sums; both scaled
    into the float lanes (d·d_x, dmin·d_x)."""

    def codegen(context, builder, sig, args):
        r = _Row(context, builder, sig, args, {0: 4, 1: 5, 2: 5, 3: 5})
        op, acc = r.op, r.new_acc()
        V4I32 = ir.VectorType(I32, 4)

        def c32(v):
            return ir.Constant(I32, v)

        with r.loop(r.length(2)) as loop:
            blk = loop.index
            o = builder.mul(blk, ir.Constant(blk.type, 144))
            w0, w1, w2 = (r.load(0, _add(builder, o, 4 + 4 * k), I32) for k in range(3))
            low6, low4, top2 = c32(0x3F3F3F3F), c32(0x0F0F0F0F), c32(0x03030303)
            # scales 0-3: low 6 bits of bytes 0-3; 4-7: low nibble of bytes 8-11, top 2 bits of bytes 0-3 above it
            sc_lo = builder.and_(w0, low6)
            sc_hi = builder.or_(
                builder.and_(w2, low4), builder.shl(builder.and_(builder.lshr(w0, c32(6)), top2), c32(4))
            )
            # mins 0-3: low 6 bits of bytes 4-7; 4-7: high nibble of bytes 8-11, top 2 bits of bytes 4-7 above it
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
            dots = ir.Constant(V8I32, [0] * 8)
            for g in range(4):
                codes = r.load(0, _add(builder, o, 16 + 32 * g), V32I8)
                for half, nib in (
                    (0, builder.and_(codes, op.const8(15))),
                    (1, builder.lshr(codes, op.const8(4))),
                ):
                    xo = _add(builder, builder.mul(blk, ir.Constant(blk.type, 256)), 64 * g + 32 * half)
                    pairs = builder.call(op.maddubs, [nib, r.load(1, xo, V32I8)])
                    scale = _splat_lane16(builder, both, 2 * g + half)
                    dots = builder.add(dots, builder.call(op.maddwd, [pairs, scale]))
            mins = builder.shuffle_vector(
                both, ir.Constant(V16I16, None), ir.Constant(ir.VectorType(I32, 8), list(range(8, 16)))
            )
            sums = r.load(3, builder.mul(blk, ir.Constant(blk.type, 8)), V8I32)
            min_lanes = builder.mul(builder.zext(mins, V8I32), sums)
            xdb = r.load(2, blk, F32, 4)
            r.scaled_add(acc, dots, builder.fmul(r.half(0, o), xdb))
            r.scaled_add(acc, min_lanes, builder.fmul(r.half(0, _add(builder, o, 2)), xdb), sub=True)
        return r.total(acc)

    return types.float32(b, xq, xd, xs, n, m), codegen


@intrinsic
def q6_k_row(typingctx, b, xq, xd, n, m):
    """Row n of a Q6_K weight b [N, K/256·210] · row m of x as Q8_K (codes xq [M, K], scales xd [M, K/256]) ->
    float32. Per
    block the 6-bit codes rebuilt from their nibbles and 2-bit parts (as `q6_k_dot256`), (q − 32)·x in int16
    pairs, weighted by the int8 scales of their 16 values in eight int32 lanes, scaled by d·d_x into the float
    lanes."""

    def codegen(context, builder, sig, args):
        r = _Row(context, builder, sig, args, {0: 3, 1: 4, 2: 4})
        op, acc = r.op, r.new_acc()
        with r.loop(r.length(2)) as loop:
            blk = loop.index
            o = builder.mul(blk, ir.Constant(blk.type, 210))
            x0 = builder.mul(blk, ir.Constant(blk.type, 256))
            scales = builder.sext(r.load(0, _add(builder, o, 192), ir.VectorType(I8, 16)), V16I16)
            dots = ir.Constant(V8I32, [0] * 8)
            for h in range(2):
                low = [r.load(0, _add(builder, o, 64 * h + 32 * k), V32I8) for k in range(2)]
                high = r.load(0, _add(builder, o, 128 + 32 * h), V32I8)
                for run in range(4):
                    nib = low[run % 2] if run < 2 else builder.lshr(low[run % 2], op.const8(4))
                    nib = builder.and_(nib, op.const8(15))
                    top = builder.and_(builder.lshr(high, op.const8(2 * run)), op.const8(3))
                    q = builder.or_(nib, builder.shl(top, op.const8(4)))  # 0..63
                    x = r.load(1, _add(builder, x0, 128 * h + 32 * run), V32I8)
                    pairs = builder.sub(
                        builder.call(op.maddubs, [q, x]), builder.call(op.maddubs, [op.const8(32), x])
                    )
                    s = 8 * h + 2 * run  # values 0-15 take scale s, 16-31 scale s + 1
                    sc = builder.shuffle_vector(
                        scales,
                        ir.Constant(V16I16, None),
                        ir.Constant(ir.VectorType(I32, 16), [s] * 8 + [s + 1] * 8),
                    )
                    dots = builder.add(dots, builder.call(op.maddwd, [pairs, sc]))
            r.scaled_add(acc, dots, builder.fmul(r.half(0, _add(builder, o, 208)), r.load(2, blk, F32, 4)))
        return r.total(acc)

    return types.float32(b, xq, xd, n, m), codegen
