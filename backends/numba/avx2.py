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
