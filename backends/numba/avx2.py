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
        self.pshufb = _fn(builder, "llvm.x86.avx2.pshuf.b", V32I8, V32I8, V32I8)

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

    def splat_in_lanes(self, v, pick):  # vpshufb: in each 128-bit half, byte i <- v[pick[i]] of that half
        # (0x80: zero). One instruction: LLVM's own lowering of a splat from the upper half took two or three
        return self.b.call(self.pshufb, [v, ir.Constant(V32I8, pick)])


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

#
# Each row kernel also asks for the weight's bytes PREFETCH_BYTES ahead of the block it reads (`prefetcht0`, one
# hint per 64-byte line). Without it a block's arithmetic and the wait for its bytes added up instead of
# overlapping: one thread over a weight far larger than the caches ran at ~1/(1/compute + 1/memory), e.g. Q6_K
# 9.4 GB/s where the same rows from L2 ran at 16.5 and a plain read of the bytes at 18.7. With the hint, 1.3-1.4x
# (Q4_K and Q6_K, one thread, random blocks of 56 / 127 MB; AMD EPYC, a shared machine, same process, interleaved,
# best of 4; 2048 bytes ahead gave 1.30-1.37x, 512 1.16x). Rows are contiguous and the threads take chunks of many
# rows, so the lines ahead are the next rows'; at a chunk's end a few hints fetch lines another thread reads.

F32 = ir.FloatType()
V8F32 = ir.VectorType(F32, 8)
PREFETCH_BYTES = 4096  # how far ahead of the block being read the row kernels ask for the weight's lines


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

    def prefetch(self, i, offset):  # a hint to fetch the cache line of byte `offset` of argument i's row
        # (`prefetcht0`; never faults, so the lines past the array's end cost nothing but the hint)
        i8p = I8.as_pointer()
        fn = _fn(self.b, "llvm.prefetch.p0i8", ir.VoidType(), i8p, I32, I32, I32)
        p = self.b.gep(self.arrays[i].data, [self.b.add(self.base[i], offset)])
        self.b.call(
            fn, [self.b.bitcast(p, i8p), ir.Constant(I32, 0), ir.Constant(I32, 3), ir.Constant(I32, 1)]
        )

    def prefetch_block(self, i, offset, nbytes):  # the lines of a block PREFETCH_BYTES ahead of `offset`
        for k in range(0, nbytes, 64):
            self.prefetch(i, _add(self.b, offset, PREFETCH_BYTES + k))

    def halves(self, i, offset):  # the two fp16 at bytes offset..offset+3 of argument i -> <2 x float>
        h2 = self.load(i, offset, ir.VectorType(ir.HalfType(), 2))
        return self.b.fpext(h2, ir.VectorType(F32, 2))

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
            r.prefetch_block(0, o, 34)
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
    of 32 xs [M, K/32] int32) -> float32. Per block: the eight 6-bit scales and mins unpacked at once from their 12
    bytes (three 32-bit words, one shift-and-mask per lane of a 4-word vector), the nibble products weighted by
    their scale in eight int32 lanes; the mins' term m_s·Σx_s (lane s) from x's sums; both scaled into the float
    lanes (d·d_x, dmin·d_x)."""

    def codegen(context, builder, sig, args):
        r = _Row(context, builder, sig, args, {0: 4, 1: 5, 2: 5, 3: 5})
        op, acc = r.op, r.new_acc()
        V4I32, V16I8 = ir.VectorType(I32, 4), ir.VectorType(I8, 16)

        def v4(*words):
            return ir.Constant(V4I32, list(words))

        def pick(vec, lanes):  # shufflevector of one vector
            return builder.shuffle_vector(
                vec, ir.Constant(vec.type, None), ir.Constant(ir.VectorType(I32, len(lanes)), lanes)
            )

        low6, low4, top2 = 0x3F3F3F3F, 0x0F0F0F0F, 0x03030303
        with r.loop(r.length(2)) as loop:
            blk = loop.index
            o = builder.mul(blk, ir.Constant(blk.type, 144))
            r.prefetch_block(0, o, 144)
            # the 12 bytes of scales and mins as words w0, w1, w2 (a 16-byte load; its last 4 bytes, codes, unused).
            # scales 0-3: low 6 bits of w0's bytes; 4-7: low nibbles of w2's, top 2 bits of w0's above them;
            # mins 0-3: low 6 bits of w1's bytes; 4-7: high nibbles of w2's, top 2 bits of w1's above them
            w = r.load(0, _add(builder, o, 4), V4I32)
            a, c = pick(w, [0, 2, 1, 2]), pick(w, [0, 0, 1, 1])
            base = builder.and_(builder.lshr(a, v4(0, 0, 0, 4)), v4(low6, low4, low6, low4))
            tops = builder.shl(
                builder.and_(builder.lshr(c, v4(6, 6, 6, 6)), v4(0, top2, 0, top2)), v4(4, 4, 4, 4)
            )
            both = builder.bitcast(builder.or_(base, tops), V16I8)  # bytes 0-7: scales, 8-15: mins
            twice = pick(both, list(range(16)) * 2)  # in both 128-bit halves, for the in-half splats
            dots = ir.Constant(V8I32, [0] * 8)
            x0 = builder.mul(blk, ir.Constant(blk.type, 256))
            for g in range(4):
                codes = r.load(0, _add(builder, o, 16 + 32 * g), V32I8)
                for half, nib in (
                    (0, builder.and_(codes, op.const8(15))),
                    (1, builder.lshr(codes, op.const8(4))),
                ):
                    s = 2 * g + half  # its scale, zero-extended to int16 in every lane
                    scale = builder.bitcast(op.splat_in_lanes(twice, [s, 0x80] * 16), V16I16)
                    pairs = builder.call(
                        op.maddubs, [nib, r.load(1, _add(builder, x0, 64 * g + 32 * half), V32I8)]
                    )
                    dots = builder.add(dots, builder.call(op.maddwd, [pairs, scale]))
            # m_s·Σx_s in one vpmaddwd on int32 lanes seen as int16 pairs: a min's upper half is 0 and a sum of 32
            # Q8_K codes fits int16 (|Σ| ≤ 32·127), so each lane is m_s times the sum's low half = the sum, exactly
            mins = builder.bitcast(builder.zext(pick(both, list(range(8, 16))), V8I32), V16I16)
            sums = builder.bitcast(r.load(3, builder.mul(blk, ir.Constant(blk.type, 8)), V8I32), V16I16)
            min_lanes = builder.call(op.maddwd, [mins, sums])
            xdb = r.load(2, blk, F32, 4)
            scales = builder.fmul(
                r.halves(0, o),
                pick(
                    builder.insert_element(
                        ir.Constant(ir.VectorType(F32, 2), None), xdb, ir.Constant(I32, 0)
                    ),
                    [0, 0],
                ),
            )  # d·d_x, dmin·d_x
            r.scaled_add(acc, dots, builder.extract_element(scales, ir.Constant(I32, 0)))
            r.scaled_add(acc, min_lanes, builder.extract_element(scales, ir.Constant(I32, 1)), sub=True)
        return r.total(acc)

    return types.float32(b, xq, xd, xs, n, m), codegen


@intrinsic
def q6_k_row(typingctx, b, xq, xd, n, m):
    """Row n of a Q6_K weight b [N, K/256·210] · row m of x as Q8_K (codes xq [M, K], scales xd [M, K/256]) ->
    float32. Per block the 6-bit codes rebuilt from their nibbles and 2-bit parts (as `q6_k_dot256`), (q − 32)·x in
    int16 pairs, weighted by the int8 scales of their 16 values in eight int32 lanes, scaled by d·d_x into the float
    lanes."""

    def codegen(context, builder, sig, args):
        r = _Row(context, builder, sig, args, {0: 3, 1: 4, 2: 4})
        op, acc = r.op, r.new_acc()
        V16I8 = ir.VectorType(I8, 16)
        with r.loop(r.length(2)) as loop:
            blk = loop.index
            o = builder.mul(blk, ir.Constant(blk.type, 210))
            r.prefetch_block(0, o, 210)
            x0 = builder.mul(blk, ir.Constant(blk.type, 256))
            # the 16 scales, even ones (values 0-15 of a run) in the low 128 bits, odd ones in the high, as int16:
            # a run's pair is then one in-half splat
            sc8 = r.load(0, _add(builder, o, 192), V16I8)
            order = ir.Constant(ir.VectorType(I32, 16), list(range(0, 16, 2)) + list(range(1, 16, 2)))
            scales = builder.bitcast(
                builder.sext(builder.shuffle_vector(sc8, ir.Constant(V16I8, None), order), V16I16), V32I8
            )
            dots = ir.Constant(V8I32, [0] * 8)
            for h in range(2):
                low = [r.load(0, _add(builder, o, 64 * h + 32 * k), V32I8) for k in range(2)]
                high = r.load(0, _add(builder, o, 128 + 32 * h), V32I8)
                for run in range(4):
                    nib = low[run % 2] if run < 2 else builder.lshr(low[run % 2], op.const8(4))
                    nib = builder.and_(nib, op.const8(15))
                    # qh's bits 2·run, 2·run + 1 moved to bits 4-5 by one shift (none for run 2)
                    shift = 4 - 2 * run
                    if shift > 0:
                        top = builder.shl(high, op.const8(shift))
                    else:
                        top = builder.lshr(high, op.const8(-shift)) if shift < 0 else high
                    q = builder.or_(nib, builder.and_(top, op.const8(0x30)))  # 0..63
                    x = r.load(1, _add(builder, x0, 128 * h + 32 * run), V32I8)
                    # (q − 32)·x pairs, exact in int16: maddubs(q, x) − maddubs(32, x)
                    pairs = builder.sub(
                        builder.call(op.maddubs, [q, x]), builder.call(op.maddubs, [op.const8(32), x])
                    )
                    e = 4 * h + run  # values 0-15 take scale 2e (low half), 16-31 scale 2e + 1 (high half)
                    sc = builder.bitcast(op.splat_in_lanes(scales, [2 * e, 2 * e + 1] * 16), V16I16)
                    dots = builder.add(dots, builder.call(op.maddwd, [pairs, sc]))
            r.scaled_add(acc, dots, builder.fmul(r.half(0, _add(builder, o, 208)), r.load(2, blk, F32, 4)))
        return r.total(acc)

    return types.float32(b, xq, xd, n, m), codegen


# ---- Q8_0 rows with VNNI: `vpdpbusd` -----------------------------------------------------------------------
#
# Where the CPU has AVX512-VNNI with AVX512VL, or AVX-VNNI, `vpdpbusd(acc s32 x8, a u8 x32, b s8 x32)` adds to
# lane i the four products a[4i..4i+3]·b[4i..4i+3] in one instruction: what `vpmaddwd(vpmaddubsw(a, b), 1)`
# leaves in lane i, without the int16 step. Q8_0's pairs never saturate that step (≤ 2·128·127 < 2¹⁵), so the
# lanes are the same integers and the row the same bits as `q8_0_row` and the loops (tested). With AVX-512 the
# row also takes two blocks per 512-bit register: no 512-bit `vpsignb` exists, so |w| is `vpabsb` and x takes
# w's sign by a masked negation (w = 0 leaves x: its product is 0 either way); the two blocks' lanes are
# converted and scaled at once and added to the float lanes in block order, as the loops add them.

_FEATURES = set(_host_features())
HAS_VNNI = HAS_AVX2 and ("+avxvnni" in _FEATURES or {"+avx512vnni", "+avx512vl"} <= _FEATURES)
HAS_VNNI_512 = {"+avx512vnni", "+avx512bw", "+avx512f"} <= _FEATURES


def _dpbusd(builder, acc, a, b):  # acc (<n x i32>) + lane-wise sums of four u8(a)·s8(b) products
    # declared with i32 vectors, the form every LLVM with VNNI reads (newer ones upgrade it to their i8
    # vectors)
    n = acc.type.count
    vec = ir.VectorType(I32, n)
    fn = _fn(builder, f"llvm.x86.avx512.vpdpbusd.{32 * n}", vec, vec, vec, vec)
    return builder.call(fn, [acc, builder.bitcast(a, vec), builder.bitcast(b, vec)])


def _q8_0_vnni_block(r, builder, acc, blk):  # one block's scaled lanes added to acc: the 256-bit step
    op = r.op
    o = builder.mul(blk, ir.Constant(blk.type, 34))
    r.prefetch_block(0, o, 34)
    w = r.load(0, _add(builder, o, 2), V32I8)
    x = r.load(1, builder.mul(blk, ir.Constant(blk.type, 32)), V32I8)
    zero = ir.Constant(V8I32, [0] * 8)
    lanes = _dpbusd(builder, zero, builder.call(op.sign, [w, w]), builder.call(op.sign, [x, w]))
    r.scaled_add(acc, lanes, builder.fmul(r.half(0, o), r.load(2, blk, F32, 4)))


def _q8_0_row_vnni(wide: bool):
    def q8_0_row_vnni(typingctx, b, xq, xd, n, m):
        def codegen(context, builder, sig, args):
            r = _Row(context, builder, sig, args, {0: 3, 1: 4, 2: 4})
            acc = r.new_acc()
            nblk = r.length(2)
            if not wide:
                with r.loop(nblk) as loop:
                    _q8_0_vnni_block(r, builder, acc, loop.index)
                return r.total(acc)
            V64I8, V16I32, V16F32 = ir.VectorType(I8, 64), ir.VectorType(I32, 16), ir.VectorType(F32, 16)
            one = ir.Constant(nblk.type, 1)
            with r.loop(builder.lshr(nblk, one)) as loop:  # blocks 2p, 2p + 1
                blk = builder.shl(loop.index, one)
                o = builder.mul(blk, ir.Constant(blk.type, 34))
                r.prefetch_block(0, o, 68)
                wa, wb = (r.load(0, _add(builder, o, 2 + 34 * k), V32I8) for k in range(2))
                w = builder.shuffle_vector(wa, wb, ir.Constant(ir.VectorType(I32, 64), list(range(64))))
                x = r.load(1, builder.mul(blk, ir.Constant(blk.type, 32)), V64I8)
                zero8 = ir.Constant(V64I8, [0] * 64)
                neg = builder.icmp_signed("<", w, zero8)
                absw = builder.select(neg, builder.sub(zero8, w), w)
                signed_x = builder.select(neg, builder.sub(zero8, x), x)
                lanes = _dpbusd(builder, ir.Constant(V16I32, [0] * 16), absw, signed_x)
                sw = builder.fpext(
                    builder.insert_element(
                        builder.insert_element(
                            ir.Constant(ir.VectorType(ir.HalfType(), 2), None),
                            builder.bitcast(r.load(0, o, I16), ir.HalfType()),
                            ir.Constant(I32, 0),
                        ),
                        builder.bitcast(r.load(0, _add(builder, o, 34), I16), ir.HalfType()),
                        ir.Constant(I32, 1),
                    ),
                    ir.VectorType(F32, 2),
                )
                scales = builder.fmul(sw, r.load(2, blk, ir.VectorType(F32, 2), 4))  # d_w·d_x of both blocks
                spread = builder.shuffle_vector(
                    scales, ir.Constant(scales.type, None), ir.Constant(V16I32, [0] * 8 + [1] * 8)
                )
                terms = builder.fmul(builder.sitofp(lanes, V16F32), spread)
                for k in range(2):  # block 2p's lanes, then 2p + 1's: the loops' order
                    half = builder.shuffle_vector(
                        terms,
                        ir.Constant(V16F32, None),
                        ir.Constant(ir.VectorType(I32, 8), list(range(8 * k, 8 * k + 8))),
                    )
                    builder.store(builder.fadd(builder.load(acc), half), acc)
            odd = builder.icmp_unsigned("!=", builder.and_(nblk, one), ir.Constant(nblk.type, 0))
            with builder.if_then(odd):  # a last block alone
                _q8_0_vnni_block(r, builder, acc, builder.sub(nblk, one))
            return r.total(acc)

        return types.float32(b, xq, xd, n, m), codegen

    q8_0_row_vnni.__name__ = q8_0_row_vnni.__qualname__ = "q8_0_row_vnni" + ("512" if wide else "")
    return intrinsic(q8_0_row_vnni)


# `q8_0_row` with `vpdpbusd` on 256-bit registers (one block an instruction) or 512-bit ones (two)
q8_0_row_vnni = _q8_0_row_vnni(False)
q8_0_row_vnni512 = _q8_0_row_vnni(True)
