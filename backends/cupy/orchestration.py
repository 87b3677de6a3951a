"""make_backend: the cupy backend's orchestration, written once against an *ops* object (CudaKernels or
NumpyTwins): the weights on the device, which kernel runs on which shapes, the MoE grouping, the device sampler.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from tinyqwen.attention import BLOCKWISE_MIN_SCORES, MASKED, CausalMask
from tinyqwen.backends.contract import Backend, LoadOptions
from tinyqwen.backends.cupy.kernels import GEMV_MAX_ROWS
from tinyqwen.backends.cupy.sampling import DeviceSampler
from tinyqwen.backends.cupy.twins import _bits_to_f32
from tinyqwen.sampling import SamplingParams

WIDEN_BLOCK_BYTES = 256 << 20  # float32 scratch for widening a bf16 weight before cuBLAS (prefill)


class DeviceWeight:
    """A weight matrix on the device in its checkpoint dtype (uint16 bf16 bits, or float32). The embedding lookup
    is the backend's `embed` kernel (rows `ids`, widened to float32 on the device), not indexing."""

    def __init__(self, data, ops):
        self.data, self.ops = data, ops
        self.bf16 = data.dtype == np.uint16

    shape = property(lambda self: self.data.shape)
    ndim = property(lambda self: self.data.ndim)
    nbytes = property(lambda self: int(self.data.nbytes))
    dtype = np.dtype(np.float32)  # what it stands for

    def __repr__(self) -> str:
        return f"DeviceWeight(shape={self.shape}, {'bf16' if self.bf16 else 'float32'})"


class _Uploads:
    """Host arrays the model builds once per forward (cos, sin, the mask) cross to the device once, not per layer.

    One entry per slot, keyed by the host object itself (held, so its id cannot be reused).
    """

    def __init__(self, xp):
        self.xp, self.held = xp, {}

    def __call__(self, slot: str, a, dtype=None):
        if not isinstance(a, np.ndarray):
            return a  # already on the device
        hit = self.held.get(slot)
        if hit is None or hit[0] is not a:
            hit = self.held[slot] = (a, self.xp.asarray(np.ascontiguousarray(a, dtype=dtype)))
        return hit[1]


@dataclass(frozen=True)
class DeviceBackend(Backend):
    ops: object = None  # NumpyTwins or CudaKernels: what `generate_on_device` samples with

    def device_sampler(self, params: SamplingParams, prompts: list[list[int]], vocab: int) -> DeviceSampler:
        """What tinyqwen.generation samples with on this backend (every option, on the device)."""
        return DeviceSampler(self.ops, params, prompts, vocab)


def make_backend(ops, name: str = "cupy") -> DeviceBackend:
    """The Backend whose kernels run through `ops` (CudaKernels on a GPU; NumpyTwins on a CPU, for CI)."""
    xp = ops.xp
    upload = _Uploads(xp)

    def embed(
        table: DeviceWeight, ids
    ):  # [V, H] on the device, host [B, T] ids -> [B, T, H] float32 on the device
        ids = np.asarray(ids)
        flat = xp.asarray(ids.reshape(-1).astype(np.int64))
        return ops.embed(table.data, flat).reshape(*ids.shape, table.shape[-1])

    def rows(x):  # [..., d] -> [M, d] float32, contiguous
        return xp.ascontiguousarray(x, dtype=np.float32).reshape(-1, x.shape[-1])

    def prepare(w: np.ndarray):
        # vectors (norm weights) become float32 (bf16 widened exactly, on the host: a few KB); matrices keep
        # the checkpoint's dtype and cross to the device once
        if w.ndim < 2:
            return xp.asarray(np.asarray(_bits_to_f32(w), np.float32))
        return DeviceWeight(xp.asarray(np.ascontiguousarray(w)), ops)

    def linear(x, w: DeviceWeight):  # [..., K], [N, K] -> [..., N]
        x2 = rows(x)
        M, N = x2.shape[0], w.shape[0]
        if not w.bf16:
            out = xp.matmul(x2, w.data.T)  # cuBLAS SGEMM (NumPy's BLAS in the stand-in)
        elif M <= GEMV_MAX_ROWS:
            out = ops.gemv_bf16(x2, w.data)  # decode: bandwidth-bound, the weight streamed once as bf16
        else:  # prefill: compute-bound, so cuBLAS on the widened weight, a block of rows at a time
            out = xp.empty((M, N), np.float32)
            block = max(1, WIDEN_BLOCK_BYTES // (4 * w.shape[1]))
            for start in range(0, N, block):
                stop = min(N, start + block)
                out[:, start:stop] = xp.matmul(x2, ops.widen(w.data[start:stop]).T)
        return out.reshape(*x.shape[:-1], N)

    def rms_norm(x, weight, eps: float):  # [..., d], [d] -> [..., d]
        return ops.rms_norm(rows(x), weight, eps).reshape(x.shape)

    def apply_rope(x, cos, sin):  # [B, H, T, d], [B, T, d] x2 -> [B, H, T, d]
        cos, sin = upload("cos", cos, np.float32), upload("sin", sin, np.float32)
        return ops.rope(xp.ascontiguousarray(x, dtype=np.float32), cos, sin)

    def attention(q, k, v, mask):  # [B, Hq, T, d], [B, Hkv, S, d] x2, [B, T, S] -> [B, Hq, T, d]
        mask = upload("mask", mask, np.bool_)
        B, Hq, T, d = q.shape
        if T == 1:  # decode: the kernel reads the cache's first S positions in place (strided, no copy)
            k = k if k.strides[-1] == k.itemsize else xp.ascontiguousarray(k)
            v = v if v.strides[-1] == v.itemsize else xp.ascontiguousarray(v)
            out = ops.decode_attention(
                xp.ascontiguousarray(q[:, :, 0]), k, v, xp.ascontiguousarray(mask[:, 0])
            )
            return out.reshape(B, Hq, 1, d)
        k, v = widen_cache(k), widen_cache(v)  # prefill: float32 products, whatever the cache stores
        Hkv = k.shape[1]  # the reference's algorithm, in xp (batched cuBLAS products)
        qg = q.reshape(B, Hkv, Hq // Hkv, T, d)
        scores = xp.matmul(qg, k[:, :, None].swapaxes(-1, -2)) * np.float32(d**-0.5)
        scores = xp.where(mask[:, None, None], scores, np.float32(MASKED))
        e = xp.exp(scores - scores.max(-1, keepdims=True))
        return xp.matmul(e / e.sum(-1, keepdims=True), v[:, :, None]).reshape(B, Hq, T, d)

    def widen_cache(a):  # [B, Hkv, S, d] in the cache's storage dtype -> float32 on the device
        if a.dtype == np.uint16:  # bf16 bits: widened exactly by the kernel (never multiplied as integers)
            return ops.widen(a)
        return a.astype(np.float32, copy=False)  # float32 as it is; float16 exactly

    def blockwise_attention(q, k, v, mask: CausalMask):  # [B, Hq, T, d], [B, Hkv, S, d] x2 -> [B, Hq, T, d]
        # a long prompt: a block of queries at a time against every key, so one block's scores stay within what
        # the model allows a prompt to allocate at once; the block's mask is built on the host and uploaded
        B, Hq, T, d = q.shape
        S = k.shape[2]
        block = max(1, BLOCKWISE_MIN_SCORES // S)
        out = xp.empty((B, Hq, T, d), np.float32)
        for t0 in range(0, T, block):
            t1 = min(T, t0 + block)
            out[:, :, t0:t1] = attention(q[:, :, t0:t1], k, v, mask.tile(t0, t1, 0, S))
        return out

    def swiglu(x, w_gate, w_up, w_down):  # [..., d] -> [..., d]
        x2 = rows(x)
        return linear(ops.silu_mul(linear(x2, w_gate), linear(x2, w_up)), w_down).reshape(x.shape)

    def expert(w: DeviceWeight, e: int) -> DeviceWeight:
        return DeviceWeight(w.data[e], ops)

    def moe_block(x, w_router, w_gate, w_up, w_down, top_k: int, norm_topk_prob: bool):
        # [N, d], [E, d], [E, f, d], [E, f, d], [E, d, f] -> output [N, d], router logits [N, E]
        x2 = rows(x)
        N, d = x2.shape
        router_logits = linear(x2, w_router)
        weights, experts = ops.route(router_logits, top_k, norm_topk_prob)  # [N, k] x2, on the device
        if N <= GEMV_MAX_ROWS:  # decode: every (token, slot) pair at once, nothing crosses to the host
            pairs = experts.reshape(-1)
            xs = ops.gather_rows(x2, xp.repeat(xp.arange(N, dtype=np.int32), top_k))
            h = ops.silu_mul(ops.expert_gemv(xs, pairs, w_gate.data), ops.expert_gemv(xs, pairs, w_up.data))
            y = ops.expert_gemv(h, pairs, w_down.data)  # [N·k, d]
        else:  # prefill: group the pairs by expert (the group sizes decide the GEMM shapes: one sync)
            flat = ops.to_numpy(experts).reshape(-1)
            y = xp.empty((N * top_k, d), np.float32)
            for e in np.unique(flat):
                pair = np.flatnonzero(flat == e).astype(np.int32)
                xs = ops.gather_rows(x2, xp.asarray(pair // top_k))
                y[xp.asarray(pair)] = swiglu(xs, expert(w_gate, e), expert(w_up, e), expert(w_down, e))
        return ops.combine(y, weights), router_logits

    return DeviceBackend(
        name=name,
        linear=linear,
        rms_norm=rms_norm,
        apply_rope=apply_rope,
        attention=attention,
        blockwise_attention=blockwise_attention,
        swiglu=swiglu,
        moe_block=moe_block,
        prepare=prepare,
        to_numpy=ops.to_numpy,
        options=LoadOptions(keep_bf16=True),  # the kernels read bf16 weights as they are stored
        embed=embed,
        argmax=ops.argmax,
        zeros=lambda shape, dtype=np.float32: xp.zeros(shape, dtype),
        ops=ops,
    )
