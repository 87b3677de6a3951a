"""CudaKernels: the launch code of every kernel in backends/cuda/*.cu (grid, block, shared memory, arguments)."""

from __future__ import annotations

from functools import cached_property

import numpy as np

from tinyqwen.backends.cupy.compile import KERNEL_DIR, compile_options, cuda_include_dirs
from tinyqwen.backends.cupy.select import FILTER_THREADS

# every kernel of every source file; tests check that each one is defined
KERNELS = {
    "norm.cu": ("rms_norm_f32",),
    "rope.cu": ("rope_f32",),
    "attention.cu": ("decode_attention_f32", "decode_attention_bf16", "decode_attention_f16"),
    "mlp.cu": ("silu_mul_f32",),
    "bf16.cu": ("widen_bf16", "embed_bf16", "embed_f32", "gemv_bf16"),
    "moe.cu": ("moe_route", "gather_rows", "gemv_expert_bf16", "gemv_expert_f32", "moe_combine"),
    "sample.cu": ("argmax_rows", "sample_rows"),
    "filter.cu": ("penalize_rows", "filter_sample_rows"),
}
GEMV_MAX_ROWS = 8  # tokens up to which a bf16 product streams the weight (TQ_GEMV_ROWS in bf16.cu)
SAMPLE_THREADS = 256  # TQ_SAMPLE_THREADS in sample.cu
# the KV cache's storage dtype -> the decode attention kernel that reads it
DECODE_ATTENTION = {
    "float32": "decode_attention_f32",
    "uint16": "decode_attention_bf16",
    "float16": "decode_attention_f16",
}


class CudaKernels:
    """The kernels of backends/cuda/*.cu, compiled for this GPU at first use, launched on the device's arrays.

    This launch code is the one way the kernels are called. `xp` is the array namespace (CuPy on a GPU) and
    `module(code=, options=, backend=)` the loader returning an object with `get_function(name)` -> a callable
    `(grid, block, args, shared_mem=0)` (`cupy.RawModule` on a GPU): any executor of CUDA C can stand in for both
    (the tests' CPU executor does), and the kernels then run through exactly these launches.
    """

    def __init__(self, xp=None, module=None):
        if xp is None:
            import cupy as xp
        self.xp = xp
        self.module = module if module is not None else xp.RawModule

    @cached_property
    def _modules(self) -> dict:
        # NVRTC's options; a loader standing in for cupy.RawModule reads the include folders it needs from them
        options = tuple(compile_options()) if cuda_include_dirs() else ("--std=c++17", f"-I{KERNEL_DIR}")
        return {
            f: self.module(code=(KERNEL_DIR / f).read_text(), options=options, backend="nvrtc")
            for f in KERNELS
        }

    def _kernel(self, name: str):
        source = next(f for f, names in KERNELS.items() if name in names)
        return self._modules[source].get_function(name)

    def to_numpy(self, a) -> np.ndarray:
        return self.xp.asnumpy(a)

    def rng(self, seed: int):
        return self.xp.random.default_rng(seed)

    def uniform(
        self, rng, n: int
    ):  # [n] float32 in [0, 1): drawn as float32 (a float64 draw may round to 1.0)
        return rng.random(n, dtype=np.float32)

    @staticmethod
    def _threads(d: int) -> int:  # a block per row: one thread per value up to 256, a multiple of 32
        return min(256, max(32, (d + 31) // 32 * 32))

    @staticmethod
    def _blocks(n: int, threads: int = 256) -> tuple[int]:
        return ((n + threads - 1) // threads,)

    def _c(
        self, a, dtype=np.float32
    ):  # kernels index flat memory: contiguous arrays of the dtype they expect
        return self.xp.ascontiguousarray(a, dtype=dtype)

    def rms_norm(self, x, weight, eps: float):
        x, weight = self._c(x), self._c(weight)
        out = self.xp.empty_like(x)
        d = x.shape[-1]
        self._kernel("rms_norm_f32")(
            (x.shape[0],), (self._threads(d),), (x, weight, out, np.int32(d), np.float32(eps))
        )
        return out

    def rope(self, x, cos, sin):
        x, cos, sin = self._c(x), self._c(cos), self._c(sin)
        B, H, T, d = x.shape
        out = self.xp.empty_like(x)
        n = B * H * T * (d // 2)
        args = (x, cos, sin, out, np.int32(B), np.int32(H), np.int32(T), np.int32(d))
        self._kernel("rope_f32")(self._blocks(n), (256,), args)
        return out

    def decode_attention(self, q, k, v, mask):
        # k, v: the cache's first S positions in its storage dtype (float32, bf16 bits, float16), unit stride along d
        q, mask = self._c(q), self._c(mask, np.bool_)
        B, Hq, d = q.shape
        Hkv, S = k.shape[1], k.shape[2]
        scores = self.xp.empty((B, Hq, S), np.float32)
        out = self.xp.empty((B, Hq, d), np.float32)
        name = DECODE_ATTENTION[np.dtype(k.dtype).name]
        ks = [np.int64(s // k.itemsize) for s in k.strides[:3]]  # element strides, whatever the item's size
        vs = [np.int64(s // v.itemsize) for s in v.strides[:3]]
        args = (q, k, v, mask, scores, out, np.int32(Hq), np.int32(Hkv), np.int32(S), np.int32(d), *ks, *vs)
        args += (np.int64(mask.strides[0]), np.float32(d**-0.5))
        self._kernel(name)((B * Hq,), (self._threads(d),), args, shared_mem=4 * d)
        return out

    def silu_mul(self, g, u):
        g, u = self._c(g), self._c(u)
        out = self.xp.empty_like(g)
        self._kernel("silu_mul_f32")(self._blocks(g.size), (256,), (g, u, out, np.int64(g.size)))
        return out

    def widen(self, bits):
        bits = self._c(bits, np.uint16)  # the kernel indexes flat memory: a strided cache slice is copied
        out = self.xp.empty(bits.shape, np.float32)
        self._kernel("widen_bf16")(self._blocks(bits.size), (256,), (bits, out, np.int64(bits.size)))
        return out

    def embed(self, table, ids):
        d = table.shape[1]
        out = self.xp.empty((ids.size, d), np.float32)
        name = "embed_bf16" if table.dtype == np.uint16 else "embed_f32"
        ids = self.xp.ascontiguousarray(ids, dtype=np.int64)
        self._kernel(name)((ids.size,), (self._threads(d),), (table, ids, out, np.int32(d)))
        return out

    def gemv_bf16(self, x, bits):
        x = self._c(x)
        M, K = x.shape
        N = bits.shape[0]
        out = self.xp.empty((M, N), np.float32)
        for m in range(0, M, GEMV_MAX_ROWS):  # the kernel takes up to TQ_GEMV_ROWS rows of x per launch
            rows = min(GEMV_MAX_ROWS, M - m)
            args = (x[m : m + rows], bits, out[m : m + rows], np.int32(rows), np.int32(N), np.int32(K))
            self._kernel("gemv_bf16")(self._blocks(32 * N), (256,), args)
        return out

    def route(self, logits, k: int, renormalise: bool):
        logits = self._c(logits)
        N, E = logits.shape
        experts = self.xp.empty((N, k), np.int32)
        weights = self.xp.empty((N, k), np.float32)
        args = (logits, np.int32(N), np.int32(E), np.int32(k), np.int32(bool(renormalise)), experts, weights)
        self._kernel("moe_route")(self._blocks(N, 64), (64,), args)
        return weights, experts

    def gather_rows(self, x, rows):
        x, rows = self._c(x), self._c(rows, np.int32)
        d = x.shape[1]
        out = self.xp.empty((rows.size, d), np.float32)
        self._kernel("gather_rows")((rows.size,), (self._threads(d),), (x, rows, out, np.int32(d)))
        return out

    def expert_gemv(self, xs, experts, w):
        xs, experts = self._c(xs), self._c(experts, np.int32)
        P, K = xs.shape
        N = w.shape[1]
        out = self.xp.empty((P, N), np.float32)
        name = "gemv_expert_bf16" if w.dtype == np.uint16 else "gemv_expert_f32"
        args = (xs, experts, w, out, np.int32(P), np.int32(N), np.int32(K))
        self._kernel(name)(self._blocks(32 * P * N), (256,), args)
        return out

    def combine(self, y, weights):
        y, weights = self._c(y), self._c(weights)
        N, k = weights.shape
        d = y.shape[1]
        out = self.xp.empty((N, d), np.float32)
        args = (y, weights, out, np.int32(N), np.int32(k), np.int32(d))
        self._kernel("moe_combine")(self._blocks(N * d), (256,), args)
        return out

    def argmax(self, logits):
        logits = self._c(logits)
        B, V = logits.shape
        out = self.xp.empty(B, np.int64)
        self._kernel("argmax_rows")((B,), (SAMPLE_THREADS,), (logits, np.int32(V), out))
        return out

    def sample(self, logits, temperature: float, u):
        logits, u = self._c(logits), self._c(u)
        B, V = logits.shape
        out = self.xp.empty(B, np.int64)
        args = (logits, np.int32(V), np.float32(1.0 / temperature), u, out)
        self._kernel("sample_rows")((B,), (SAMPLE_THREADS,), args)
        return out

    def penalize(self, logits, seen, counts, repetition, presence, frequency, temperature):
        logits = self._c(logits)
        B, V = logits.shape
        x = self.xp.empty((B, V), np.float64)
        bad = self.xp.zeros(B, np.int32)
        args = (logits, seen, counts, np.int32(V), np.float64(repetition), np.float64(presence))
        args += (np.float64(frequency), np.float64(temperature), x, bad)
        self._kernel("penalize_rows")((*self._blocks(V), B), (256,), args)
        return x, bad

    def filter_sample(self, x, top_k, top_p, min_p, greedy, u, forced, bad, seen, counts):
        B, V = x.shape  # seen, counts: the sampler's own device arrays, updated in place (never copies)
        e = self.xp.empty((B, V), np.float64)
        mass = self.xp.empty((B, V), np.uint64)
        out = self.xp.empty(B, np.int64)
        u = self._c(self.xp.asarray(u), np.float64)  # host -> device: B numbers per step
        forced = self._c(self.xp.asarray(forced), np.int64)
        args = (x, e, mass, np.int32(V), np.int32(top_k), np.float64(top_p), np.float64(min_p))
        args += (np.int32(bool(greedy)), u, forced, bad, seen, counts, out)
        self._kernel("filter_sample_rows")((B,), (FILTER_THREADS,), args)
        return out
