"""The "numba" backend: the model's hot kernels compiled for the CPU, reading bf16 weights directly.

Decoding one token is memory-bound: every weight is read once and used for one multiply-add. So the weights stay in
the checkpoint's dtype — BF16 as its uint16 bit patterns (`BF16Weight`), F32 as the read-only memory map — and a
GEMV widens each bf16 row *in registers* (`u32 << 16` reinterpreted as float32, exact) while it streams: 2 bytes
read per weight instead of 4. The kernels, all behind the `Backend` interface of `backends/__init__.py` (same
signatures as the NumPy reference in `tinyqwen/`, which the tests compare them with):

    linear      M ≤ GEMV_MAX_ROWS tokens: parallel bf16 GEMV (each weight row widened once, used for all M rows);
                more tokens (prefill): widen a block of weight rows into a float32 scratch buffer and call BLAS
    rms_norm    one pass per row (also QK-Norm: the same kernel over head_dim)
    apply_rope  one pass, no rotate_half temporaries
    attention   one query position (decode): each kv head is read once for its whole group of query heads;
                longer queries (prefill) use the NumPy reference, whose batched BLAS matmuls are faster there
    swiglu      decode: gate and up GEMVs fused with SiLU·mul (x read once, no [ffn] temporaries), then down
    moe_block   only the routed experts run: decode in one fused kernel over all (token, expert) pairs; prefill
                groups the tokens by expert (each expert's weights read once per call)

`@njit(cache=True)`: the first call of a kernel compiles it (seconds) and stores the machine code next to this
file, so later processes start fast. Float32 weights (F32 checkpoints) use NumPy's BLAS for the products.
"""

from __future__ import annotations

import os

# Numba's OpenMP threads spin after each parallel kernel by default. On a machine whose cores are shared (other
# processes runnable), a spinning thread holds the core its partner needs, and a 0.3 ms GEMV took 11 ms (measured
# on 2 shared cores); passive waiting costs microseconds per launch instead. Must be set before libgomp starts;
# a value the user set wins.
os.environ.setdefault("OMP_WAIT_POLICY", "passive")

import numba  # noqa: E402
import numpy as np  # noqa: E402
from llvmlite import ir  # noqa: E402
from numba import njit, prange, types  # noqa: E402
from numba.extending import intrinsic  # noqa: E402

from backends import Backend  # noqa: E402
from tinyqwen import attention as np_attention  # noqa: E402
from tinyqwen.moe import route  # noqa: E402
from tinyqwen.safetensors import bf16_to_float32  # noqa: E402

GEMV_MAX_ROWS = 4  # up to this many tokens a product streams the bf16 weights; beyond, widen blocks + BLAS
# float32 scratch for a block of weight rows in the BLAS path: every matrix of Qwen3-0.6B but the lm_head fits
# in one block (one sgemm call, as fast as NumPy's); 4 MiB blocks cost up to 1.7x in BLAS calls here (measured)
WIDEN_BLOCK_BYTES = 16 << 20
MASKED = np_attention.MASKED
# reassociation lets LLVM vectorise the float32 dot products (8 or 16 partial sums, as BLAS does); no other
# fast-math flags, so NaN and inf still propagate as in the NumPy reference
FAST = {"reassoc"}


class BF16Weight:
    """A bf16 weight kept as its uint16 bit patterns; indexing widens the rows it picks (the embedding lookup).

    >>> w = BF16Weight(np.array([[0x3F80, 0xC000], [0x3FC0, 0x0000]], dtype=np.uint16))
    >>> w[np.array([1, 0])]
    array([[ 1.5,  0. ],
           [ 1. , -2. ]], dtype=float32)
    """

    def __init__(self, bits: np.ndarray):
        if bits.dtype != np.uint16:
            raise TypeError(f"BF16Weight holds uint16 bit patterns, got {bits.dtype}")
        self.bits = bits

    shape = property(lambda self: self.bits.shape)
    ndim = property(lambda self: self.bits.ndim)
    nbytes = property(lambda self: self.bits.nbytes)
    dtype = np.dtype(np.float32)  # what it stands for

    def __getitem__(self, index) -> np.ndarray:
        return bf16_to_float32(self.bits[index])

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        return bf16_to_float32(self.bits).astype(dtype or np.float32, copy=False)

    def __repr__(self) -> str:
        return f"BF16Weight(shape={self.shape})"


def prepare(w: np.ndarray):
    """Checkpoint tensor -> the backend's weight: bf16 matrices stay bf16, vectors (norm weights) become float32."""
    if w.dtype == np.uint16:
        return BF16Weight(w) if w.ndim >= 2 else bf16_to_float32(w)
    return w  # float32: the read-only memory map, as loaded


# --------------------------------------------------------------------------------------------- kernels


@intrinsic
def _bf16(typingctx, u):
    """uint16 bf16 bit pattern -> float32, in a register: zero-extend, shift left 16, reinterpret the 32 bits.

    Numba has no scalar bit-cast, so this is one LLVM instruction sequence; the dot products around it still
    vectorise (about 20 GB/s of bf16 per core measured here, against 10 GB/s for NumPy's float32 GEMV).
    """

    def codegen(context, builder, signature, args):
        wide = builder.zext(args[0], ir.IntType(32))
        return builder.bitcast(builder.shl(wide, ir.Constant(ir.IntType(32), 16)), ir.FloatType())

    return types.float32(types.uint16), codegen


@njit(parallel=True, cache=True, fastmath=FAST)
def _gemv_bf16(x, w, out, chunks):  # [M, K] f32, [N, K] u16, [M, N] f32 (out written)
    M, K = x.shape
    N = w.shape[0]
    chunks = min(N, chunks)  # a few chunks of rows per thread
    size = (N + chunks - 1) // chunks
    for c in prange(chunks):
        for n in range(c * size, min(N, (c + 1) * size)):
            for m in range(M):  # M ≤ GEMV_MAX_ROWS: the weight row is still in L1 for the next token
                acc = np.float32(0.0)
                for k in range(K):
                    acc += x[m, k] * _bf16(w[n, k])
                out[m, n] = acc


@njit(cache=True)
def _widen(w, out):  # [N, K] u16 -> [N, K] f32 (out written)
    # one thread: it alternates with BLAS, whose own threads are still spinning when it starts
    N, K = w.shape
    for n in range(N):
        for k in range(K):
            out[n, k] = _bf16(w[n, k])


@njit(parallel=True, cache=True, fastmath=FAST)
def _gate_up_bf16(
    x, w_gate, w_up, out, chunks
):  # [M, K] f32, [F, K] u16 x2 -> out [M, F]: silu(x Wgᵀ)·(x Wuᵀ)
    M, K = x.shape
    F = w_gate.shape[0]
    chunks = min(F, chunks)
    size = (F + chunks - 1) // chunks
    for c in prange(chunks):
        for f in range(c * size, min(F, (c + 1) * size)):
            for m in range(M):
                g = np.float32(0.0)
                u = np.float32(0.0)
                for k in range(K):
                    g += x[m, k] * _bf16(w_gate[f, k])
                    u += x[m, k] * _bf16(w_up[f, k])
                out[m, f] = g / (np.float32(1.0) + np.exp(-g)) * u


# Small kernels run on one thread: a parallel launch costs microseconds, and far more when the cores are shared
# and the other thread waits to be scheduled; these touch kilobytes per decode step.


@njit(cache=True)
def _silu_mul(g, u):  # [M, F] x2 -> [M, F]
    out = np.empty_like(g)
    M, F = g.shape
    for m in range(M):
        for f in range(F):
            z = g[m, f]
            out[m, f] = z / (np.float32(1.0) + np.exp(-z)) * u[m, f]
    return out


@njit(cache=True, fastmath=FAST)
def _rms_norm(x, weight, eps, out):  # [R, d], [d], scalar -> out [R, d]
    R, d = x.shape
    for r in range(R):
        ss = np.float32(0.0)
        for j in range(d):
            ss += x[r, j] * x[r, j]
        scale = np.float32(1.0) / np.sqrt(ss / np.float32(d) + eps)
        for j in range(d):
            out[r, j] = x[r, j] * scale * weight[j]


@njit(cache=True)
def _rope(x, cos, sin, out):  # [B, H, T, d], [B, T, d] x2 -> out [B, H, T, d]
    B, H, T, d = x.shape
    half = d // 2
    for bh in range(B * H):
        b, h = bh // H, bh % H
        for t in range(T):
            for j in range(half):
                a, c = x[b, h, t, j], x[b, h, t, j + half]
                # exactly the reference's x·cos + rotate_half(x)·sin, with rotate_half(x) = [-x2, x1]
                out[b, h, t, j] = a * cos[b, t, j] - c * sin[b, t, j]
                out[b, h, t, j + half] = c * cos[b, t, j + half] + a * sin[b, t, j + half]


@intrinsic
def _f16(typingctx, u):
    """uint16 float16 bit pattern -> float32, in a register (x86's F16C `vcvtph2ps`): exact, like bf16's widening."""

    def codegen(context, builder, signature, args):
        return builder.fpext(builder.bitcast(args[0], ir.HalfType()), ir.FloatType())

    return types.float32(types.uint16), codegen


KV_FLOAT32, KV_BF16, KV_F16 = (
    0,
    1,
    2,
)  # how a KV cache stores its values (float16 is passed as its uint16 view)


def _kv(x, kind):  # one stored key/value element -> float32 (compiled by the overload below)
    raise NotImplementedError


@numba.extending.overload(_kv)
def _kv_overload(x, kind):
    # a float32 cache compiles to the plain load; a uint16 one widens in registers, never the whole cache
    if isinstance(x, types.Float):
        return lambda x, kind: x
    if x == types.uint16:
        return lambda x, kind: _bf16(x) if kind == KV_BF16 else _f16(x)
    return None


@njit(cache=True, fastmath=FAST)
def _attend_group(q, k, v, mask, out, b, h, kind):  # one kv head h of row b and its group of query heads
    Hq, d = q.shape[1], q.shape[2]
    Hkv, S = k.shape[1], k.shape[2]
    group = Hq // Hkv
    scale = np.float32(d**-0.5)
    scores = np.empty((group, S), np.float32)
    for s in range(S):  # each key row is read once and used by every query head of the group
        for g in range(group):
            acc = np.float32(0.0)
            for j in range(d):
                acc += q[b, h * group + g, j] * _kv(k[b, h, s, j], kind)
            scores[g, s] = acc * scale if mask[b, s] else MASKED
    for g in range(group):
        top = scores[g, 0]
        for s in range(1, S):
            top = max(top, scores[g, s])
        total = np.float32(0.0)
        for s in range(S):
            scores[g, s] = np.exp(scores[g, s] - top)
            total += scores[g, s]
        for s in range(S):
            scores[g, s] /= total
    acc = np.zeros((group, d), np.float32)
    for s in range(S):  # each value row, likewise, once per group
        for g in range(group):
            p = scores[g, s]
            for j in range(d):
                acc[g, j] += p * _kv(v[b, h, s, j], kind)
    for g in range(group):
        for j in range(d):
            out[b, h * group + g, j] = acc[g, j]


@njit(parallel=True, cache=True, fastmath=FAST)
def _moe_decode_bf16(x, experts, weights, w_gate, w_up, w_down, out, chunks):
    # x [N, d] f32, experts/weights [N, k] (routing), w_gate/w_up [E, f, d] u16, w_down [E, d, f] u16 -> out [N, d]
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
        e, t = experts[p // k, p % k], p // k
        for f in range(c * size, min(F, (c + 1) * size)):
            g = np.float32(0.0)
            u = np.float32(0.0)
            for j in range(d):
                g += x[t, j] * _bf16(w_gate[e, f, j])
                u += x[t, j] * _bf16(w_up[e, f, j])
            h[p, f] = g / (np.float32(1.0) + np.exp(-g)) * u
    rows = min(d, chunks)
    size = (d + rows - 1) // rows
    for c in prange(rows):
        for i in range(c * size, min(d, (c + 1) * size)):
            for t in range(N):
                total = np.float32(0.0)
                for s in range(k):  # the token's experts, summed in slot order
                    e = experts[t, s]
                    acc = np.float32(0.0)
                    for f in range(F):
                        acc += h[t * k + s, f] * _bf16(w_down[e, i, f])
                    total += weights[t, s] * acc
                out[t, i] = total


# short contexts on one thread (a parallel launch costs more than the work), long ones over the kv heads
PARALLEL_ATTENTION_BYTES = 1 << 20  # of keys and values read per step


@njit(cache=True)
def _decode_attention_serial(
    q, k, v, mask, out, kind
):  # [B, Hq, d], [B, Hkv, S, d] x2 (float32, or uint16 bf16/f16 bits), [B, S] bool -> out [B, Hq, d]
    B, Hkv = k.shape[0], k.shape[1]
    for bh in range(B * Hkv):
        _attend_group(q, k, v, mask, out, bh // Hkv, bh % Hkv, kind)


@njit(parallel=True, cache=True)
def _decode_attention_parallel(
    q, k, v, mask, out, kind
):  # the same, (row, kv head) pairs spread over threads
    B, Hkv = k.shape[0], k.shape[1]
    for bh in prange(B * Hkv):
        _attend_group(q, k, v, mask, out, bh // Hkv, bh % Hkv, kind)


# --------------------------------------------------------------------------------------------- the interface


def _chunks() -> int:  # work items for a parallel GEMV: several per thread, so a slow thread holds no one up
    return 8 * numba.get_num_threads()


def _rows(x: np.ndarray) -> np.ndarray:  # [..., d] -> [M, d] float32, C-contiguous
    return np.ascontiguousarray(x, dtype=np.float32).reshape(-1, x.shape[-1])


def linear(x: np.ndarray, w) -> np.ndarray:  # [..., d_in], [d_out, d_in] -> [..., d_out]
    if not isinstance(w, BF16Weight):
        return x @ w.T  # float32 weights: BLAS, as the reference
    x2 = _rows(x)
    bits = w.bits
    N, K = bits.shape
    block = max(1, min(N, WIDEN_BLOCK_BYTES // (4 * K)))
    if x2.shape[0] <= GEMV_MAX_ROWS:
        out = np.empty((x2.shape[0], N), np.float32)
        _gemv_bf16(x2, bits, out, _chunks())
    elif block == N:  # prefill: compute-bound, so BLAS's sgemm on the widened weight
        scratch = np.empty((N, K), np.float32)
        _widen(bits, scratch)
        out = x2 @ scratch.T
    else:  # the same, a block of rows at a time: the float32 copy never exceeds WIDEN_BLOCK_BYTES
        out = np.empty((x2.shape[0], N), np.float32)
        scratch = np.empty((block, K), np.float32)
        for start in range(0, N, block):
            stop = min(N, start + block)
            _widen(bits[start:stop], scratch[: stop - start])
            out[:, start:stop] = x2 @ scratch[: stop - start].T  # BLAS sgemm on the widened block
    return out.reshape(*x.shape[:-1], N)


def rms_norm(x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:  # [..., d], [d] -> [..., d]
    x2 = _rows(x)
    out = np.empty_like(x2)
    _rms_norm(x2, np.asarray(weight, np.float32), np.float32(eps), out)
    return out.reshape(x.shape)


def apply_rope(x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    # [B, H, T, d], [B, T, d], [B, T, d] -> [B, H, T, d]
    out = np.empty(x.shape, np.float32)
    _rope(x.astype(np.float32, copy=False), cos, sin, out)
    return out


def attention(q: np.ndarray, k: np.ndarray, v: np.ndarray, mask: np.ndarray) -> np.ndarray:
    # [B, Hq, T, d], [B, Hkv, S, d], [B, Hkv, S, d] (float32, or a bf16 / float16 KV cache), [B, T, S] bool
    # -> [B, Hq, T, d]
    B, Hq, T, d = q.shape
    if T != 1:
        return np_attention.attention(q, k, v, mask)
    # a narrow cache is read as it is stored: each element widened in registers (bf16 as uint16 bit patterns;
    # float16 passed as its uint16 view, since Numba has no float16 arrays)
    kind = {np.dtype(np.uint16): KV_BF16, np.dtype(np.float16): KV_F16}.get(k.dtype, KV_FLOAT32)
    if kind == KV_F16:
        k, v = k.view(np.uint16), v.view(np.uint16)
    out = np.empty((B, Hq, d), np.float32)
    kernel = (
        _decode_attention_parallel if 2 * k.nbytes > PARALLEL_ATTENTION_BYTES else _decode_attention_serial
    )
    kernel(np.ascontiguousarray(q[:, :, 0], np.float32), k, v, np.ascontiguousarray(mask[:, 0]), out, kind)
    return out.reshape(B, Hq, 1, d)


def swiglu(x: np.ndarray, w_gate, w_up, w_down) -> np.ndarray:  # [..., d], [f, d], [f, d], [d, f] -> [..., d]
    x2 = _rows(x)
    if isinstance(w_gate, BF16Weight) and isinstance(w_up, BF16Weight) and x2.shape[0] <= GEMV_MAX_ROWS:
        h = np.empty((x2.shape[0], w_gate.shape[0]), np.float32)
        _gate_up_bf16(x2, w_gate.bits, w_up.bits, h, _chunks())
    else:
        h = _silu_mul(linear(x2, w_gate), linear(x2, w_up))
    return linear(h, w_down).reshape(x.shape)


def _expert(w, e: int):  # one expert's [rows, cols] weight out of the stacked [E, rows, cols]
    return BF16Weight(w.bits[e]) if isinstance(w, BF16Weight) else w[e]


def moe_block(x, w_router, w_gate, w_up, w_down, top_k: int, norm_topk_prob: bool):
    # [N, d], [E, d], [E, f, d], [E, f, d], [E, d, f] -> output [N, d], router logits [N, E]
    router_logits = linear(x, w_router)
    weights, experts = route(router_logits, top_k, norm_topk_prob)  # the reference's routing, ties included
    if isinstance(w_gate, BF16Weight) and x.shape[0] <= GEMV_MAX_ROWS:  # decode: one fused kernel
        out = np.empty(x.shape, np.float32)
        _moe_decode_bf16(
            _rows(x), experts, weights.astype(np.float32), w_gate.bits, w_up.bits, w_down.bits, out, _chunks()
        )
        return out, router_logits
    out = np.zeros(x.shape, np.float32)
    # only the routed experts run; each runs once, on all the tokens that chose it (its weights read once)
    for e in np.unique(experts):
        token, slot = np.nonzero(experts == e)
        y = swiglu(x[token], _expert(w_gate, e), _expert(w_up, e), _expert(w_down, e))
        out[token] += y * weights[token, slot, None]  # a token picks an expert at most once: no repeats
    return out, router_logits


def backend() -> Backend:
    return Backend(
        name="numba",
        linear=linear,
        rms_norm=rms_norm,
        apply_rope=apply_rope,
        attention=attention,
        swiglu=swiglu,
        moe_block=moe_block,
        prepare=prepare,
        to_numpy=np.asarray,
        keep_bf16=True,
    )
