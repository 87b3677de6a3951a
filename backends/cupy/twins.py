"""NumpyTwins: each CUDA kernel of backends/cuda/*.cu written again in NumPy, the stand-in's "device".

Two kinds of twin, named as such in each method's comment:
- *mirrors* compute what the kernel computes in the kernel's order, so their results equal the kernel's to the last
  bit or the same id: rope, silu_mul, widen, embed, combine (slot order), penalize (the same correctly rounded
  float64 operations), filter_sample (radix select, chunked inverse CDF: select.py) and sample (256 chunks summed
  as sample_rows' threads sum them);
- *reference math* computes the same quantity the obvious NumPy way, not the kernel's block and warp reductions:
  rms_norm, decode_attention, gemv_bf16, expert_gemv (sums in another order: equal to ~1e-6), route (tinyqwen.moe's
  routing itself) and argmax (np.argmax). What they cannot check — the reductions, strides, launch shapes, shared
  memory, dtypes — is checked by running the kernels themselves on the tests' CPU executor of CUDA C.
"""

from __future__ import annotations

import numpy as np

from tinyqwen.attention import MASKED
from tinyqwen.backends.contract import FINISHED
from tinyqwen.backends.cupy.kernels import SAMPLE_THREADS
from tinyqwen.backends.cupy.select import filter_sample_row
from tinyqwen.bf16 import bf16_to_float32
from tinyqwen.moe import route


def _widen_cache(a: np.ndarray) -> np.ndarray:  # a KV cache slice in its storage dtype -> float32
    return bf16_to_float32(a) if a.dtype == np.uint16 else a.astype(np.float32, copy=False)


def _bits_to_f32(w: np.ndarray) -> np.ndarray:
    return bf16_to_float32(w) if w.dtype == np.uint16 else w


class NumpyTwins:
    """Each CUDA kernel of backends/cuda/*.cu as NumPy: the same inputs and outputs (a mirror or reference math: see
    the module's docstring); the stand-in's ops, and what the kernels are compared with.

    >>> ops = NumpyTwins()
    >>> ops.argmax(np.array([[1.0, 3.0, 3.0]], np.float32)).tolist()  # the lowest id on ties, as argmax_rows
    [1]
    """

    xp = np

    def to_numpy(self, a) -> np.ndarray:
        return np.asarray(a)

    def rng(self, seed: int):
        return np.random.default_rng(seed)

    def uniform(
        self, rng, n: int
    ):  # [n] float32 in [0, 1): drawn as float32 (a float64 draw may round to 1.0)
        return rng.random(n, dtype=np.float32)

    def rms_norm(self, x, weight, eps: float):  # [R, d], [d] -> [R, d]   reference math (rms_norm_f32)
        scale = np.float32(1.0) / np.sqrt(
            (x * x).sum(-1, keepdims=True) / np.float32(x.shape[-1]) + np.float32(eps)
        )
        return x * scale * weight

    def rope(self, x, cos, sin):  # [B, H, T, d], [B, T, d] x2 -> [B, H, T, d]      (rope_f32)
        half = x.shape[-1] // 2
        a, e = x[..., :half], x[..., half:]
        c, s = cos[:, None], sin[:, None]
        return np.concatenate(
            [a * c[..., :half] - e * s[..., :half], e * c[..., half:] + a * s[..., half:]], -1
        )

    def decode_attention(self, q, k, v, mask):  # [B, Hq, d], [B, Hkv, S, d] x2, [B, S] -> [B, Hq, d]
        B, Hq, d = q.shape
        Hkv = k.shape[1]
        k, v = _widen_cache(k), _widen_cache(v)  # the cache's storage dtype (float32, bf16 bits, float16)
        qg = q.reshape(B, Hkv, Hq // Hkv, d)  # query head h reads kv head h // group   (decode_attention_f32)
        scores = np.einsum("bhgd,bhsd->bhgs", qg, k) * np.float32(d**-0.5)
        scores = np.where(mask[:, None, None], scores, MASKED)
        e = np.exp(scores - scores.max(-1, keepdims=True))
        return (np.einsum("bhgs,bhsd->bhgd", e, v) / e.sum(-1, keepdims=True)).reshape(B, Hq, d)

    def silu_mul(self, g, u):  # [...] x2 -> [...]                                     (silu_mul_f32)
        with np.errstate(over="ignore"):
            return g / (np.float32(1.0) + np.exp(-g)) * u

    def widen(self, bits):  # bf16 bits [...] -> float32 [...]                         (widen_bf16)
        return bf16_to_float32(bits)

    def embed(self, table, ids):  # [V, d] (bf16 bits or f32), [n] int64 -> [n, d]    (embed_bf16 / embed_f32)
        return _bits_to_f32(table[ids])

    def gemv_bf16(self, x, bits):  # [M, K] f32, [N, K] bf16 bits -> [M, N]   reference math (gemv_bf16)
        return x @ bf16_to_float32(bits).T

    def route(self, logits, k: int, renormalise: bool):  # [N, E] -> weights [N, k] f32, experts [N, k] int32
        weights, experts = route(logits, k, renormalise)  # reference math: tinyqwen.moe's routing (moe_route)
        return weights.astype(np.float32), experts.astype(np.int32)

    def gather_rows(self, x, rows):  # [N, d], [P] int32 -> [P, d]                      (gather_rows)
        return x[rows]

    def expert_gemv(
        self, xs, experts, w
    ):  # [P, K], [P] int32, [E, N, K] -> [P, N]   reference math (gemv_expert_*)
        out = np.empty((xs.shape[0], w.shape[1]), np.float32)
        for p, e in enumerate(experts.tolist()):
            out[p] = _bits_to_f32(w[e]) @ xs[p]
        return out

    def combine(self, y, weights):  # [N·k, d], [N, k] -> [N, d], summed in slot order   (moe_combine)
        N, k = weights.shape
        y = y.reshape(N, k, -1)
        out = weights[:, 0, None] * y[:, 0]
        for slot in range(1, k):
            out = out + weights[:, slot, None] * y[:, slot]
        return out

    def argmax(self, logits):  # [B, V] -> [B] int64   reference math: np.argmax, NaN first (argmax_rows)
        return np.argmax(logits, axis=-1).astype(np.int64)

    def sample(self, logits, temperature: float, u):  # [B, V], [B] -> [B] int64   mirror (sample_rows)
        # the kernel's sums, in its order: SAMPLE_THREADS contiguous chunks of ids, each summed in id order by its
        # thread (float32), then thread 0's running sum over the chunks; one float32 sum over 151,936 ids picks
        # another id in a fifth of full-vocabulary draws
        B, V = logits.shape
        T, chunk = SAMPLE_THREADS, -(-V // SAMPLE_THREADS)
        top = logits.max(-1, keepdims=True)
        e = np.exp((logits - top) * np.float32(1.0 / temperature)).astype(np.float32)
        padded = np.zeros((B, T * chunk), np.float32)
        padded[:, :V] = e
        chunk_total = np.cumsum(padded.reshape(B, T, chunk), axis=-1, dtype=np.float32)[..., -1]  # [B, T]
        before = np.cumsum(chunk_total, axis=-1, dtype=np.float32)  # [B, T] thread 0's running sum
        target = np.asarray(u, np.float32) * before[:, -1]
        chosen = []
        for b in range(B):
            crossed = np.flatnonzero(
                before[b, :-1] > target[b]
            )  # the first chunk taking the sum past the target
            c = int(crossed[0]) if crossed.size else T - 1
            lo, hi = c * chunk, min(V, (c + 1) * chunk)
            if lo >= hi:
                chosen.append(min(V - 1, lo))
                continue
            start = before[b, c - 1] if c else np.float32(0.0)
            running = np.cumsum(np.concatenate([[start], e[b, lo:hi]]).astype(np.float32), dtype=np.float32)[
                1:
            ]
            past = np.flatnonzero(
                running > target[b]
            )  # the first id whose cumulative weight exceeds the target
            chosen.append(lo + int(past[0]) if past.size else hi - 1)
        return np.array(chosen, np.int64)

    def penalize(self, logits, seen, counts, repetition, presence, frequency, temperature):
        # [B, V] f32, [B, V] uint8, [B, V] int32 -> x [B, V] float64, bad [B] int32        (penalize_rows)
        bad = (~np.isfinite(logits)).any(-1).astype(np.int32)
        with np.errstate(invalid="ignore", over="ignore"):
            v = np.asarray(logits, np.float64)
            v = np.where(seen != 0, np.where(v > 0, v / repetition, v * repetition), v)
            v = v - np.where(counts > 0, presence, 0.0)
            v = v - frequency * counts.astype(np.float64)
            return v / temperature, bad

    def filter_sample(self, x, top_k, top_p, min_p, greedy, u, forced, bad, seen, counts):
        # [B, V] f64, ..., u [B] f64, forced [B] int64 -> [B] int64; records the ids in seen, counts (filter_sample_rows)
        out = np.empty(x.shape[0], np.int64)
        for b in range(x.shape[0]):
            f = int(forced[b])
            if f == FINISHED or bad[b]:
                out[b] = FINISHED if f == FINISHED else -1
                continue
            token = f if f >= 0 else filter_sample_row(x[b], top_k, top_p, min_p, greedy, float(u[b]))
            out[b] = token
            if token < x.shape[1]:  # a forced id outside the vocabulary is the host's to reject
                counts[b, token] += 1
                seen[b, token] = 1
        return out
