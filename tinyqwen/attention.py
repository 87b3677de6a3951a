"""Grouped-query attention (GQA) with QK-Norm and a causal mask.

For one head: attention(q, k, v) = softmax(q kᵀ / sqrt(head_dim) + mask) v.

Qwen3's twists on the textbook version:
- **GQA**: fewer key/value heads than query heads (Qwen3-0.6B: 16 query heads share 8 kv heads, so each kv head
  serves a *group* of 2 query heads). The KV cache shrinks by that ratio. We never copy k/v per query head:
  queries are reshaped into [kv_heads, group, ...] and broadcast against their kv head.
- **QK-Norm**: an RMSNorm over head_dim on every query and key head, *before* RoPE — it keeps attention logits
  bounded and training stable.
- `head_dim` is not hidden_size / heads (0.6B: 16 × 128 = 2048 ≠ 1024), so q_proj maps 1024 → 2048 and o_proj
  maps 2048 → 1024.

Masks are boolean, True where a query may look at a key: causal (no peeking ahead) and, for batches with left
padding, False on the padding keys.

Long prompts: the plain version materialises every score, [B, Hq, T, S] float32 — a 32,768-token prompt
of Qwen3-0.6B would need 16 · 32768² · 4 B = 64 GiB for one layer. `blockwise_attention` ("flash attention")
computes the same result one [query block, key block] tile at a time with an *online softmax*: it keeps, per query,
the running maximum m, the running sum of exponentials l and the running weighted sum of values acc, and rescales
them by exp(m_old − m_new) whenever a later block raises the maximum. Memory: one tile of scores, never [T, S].
Its mask is a `CausalMask` (key padding + the causal offset), turned into one tile of booleans at a time.
Keys and values may be stored narrower than float32 (a bfloat16 or float16 KV cache): `widen` widens them,
one key block at a time in the blockwise version.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from tinyqwen.bf16 import bf16_to_float32
from tinyqwen.errors import GenerationError

# a large negative number rather than -inf: a query row with every key masked (a padding row) then gets a harmless
# uniform average instead of NaN, exactly as transformers does with finfo.min
MASKED = np.finfo(np.float32).min


def softmax(x: np.ndarray, axis: int = -1) -> np.ndarray:  # [...] -> [...]
    x = x - np.max(x, axis=axis, keepdims=True)  # subtract the max: exp never overflows
    e = np.exp(x)
    return e / np.sum(e, axis=axis, keepdims=True)


def causal_mask(n_q: int, n_k: int) -> np.ndarray:  # -> [n_q, n_k] bool
    """Queries are the *last* n_q of n_k positions (with a KV cache, earlier keys come from the cache).

    >>> causal_mask(2, 3).astype(int)
    array([[1, 1, 0],
           [1, 1, 1]])
    """
    return np.arange(n_k)[None, :] <= np.arange(n_k - n_q, n_k)[:, None]


def positions_from_mask(mask: np.ndarray) -> np.ndarray:  # [B, S] 0/1 -> [B, S] int64
    """Each token's position counts only the real tokens before it: `cumsum(mask) - 1` (padding gets 0).

    With left padding, a row's first real token is position 0 whatever its column, so a padded row computes
    exactly what it would compute alone.

    >>> positions_from_mask(np.array([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])).tolist()
    [[0, 0, 0, 1, 2], [0, 1, 2, 3, 4]]
    """
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise GenerationError(f"an attention mask has shape [batch, length], got shape {list(mask.shape)}")
    return np.maximum(np.cumsum(mask.astype(np.int64), axis=1) - 1, 0)


def widen(
    x: np.ndarray,
) -> np.ndarray:  # [...] bf16 bits (uint16) / float16 -> [...] float32; others as they are
    """Keys or values as the cache stored them, widened to float32 when it stored 2 bytes per value: uint16 always
    means bfloat16 bit patterns. float32 (and float64, e.g. for numerical gradients) pass through unchanged.

    >>> widen(np.array([0x3F80, 0xC000], np.uint16)).tolist(), widen(np.float16([0.5])).dtype
    ([1.0, -2.0], dtype('float32'))
    """
    if x.dtype == np.uint16:
        return bf16_to_float32(x)
    if x.dtype == np.float16:
        return x.astype(np.float32)
    return x


def attention(q: np.ndarray, k: np.ndarray, v: np.ndarray, mask: np.ndarray) -> np.ndarray:
    # [B, Hq, T, d], [B, Hkv, S, d], [B, Hkv, S, d], [B, T, S] bool -> [B, Hq, T, d]
    k, v = widen(k), widen(v)  # a narrow KV cache is widened here, all of it (see blockwise_attention)
    B, Hq, T, d = q.shape
    Hkv = k.shape[1]
    group = Hq // Hkv
    # query head h uses kv head h // group: view the queries as [B, Hkv, group, T, d] and broadcast k, v
    qg = q.reshape(B, Hkv, group, T, d)
    scores = (qg @ k[:, :, None].swapaxes(-1, -2)) * np.float32(d**-0.5)  # [B, Hkv, group, T, S]
    scores = np.where(mask[:, None, None], scores, MASKED)
    out = softmax(scores) @ v[:, :, None]  # [B, Hkv, group, T, d]
    return out.reshape(B, Hq, T, d)


# --------------------------------------------------------------------------------------------- long prompts

QUERY_BLOCK = 512  # queries per tile
KEY_BLOCK = 1024  # keys per tile: a tile of Qwen3-0.6B's scores is 16 heads · 512 · 1024 · 4 B = 32 MiB
# the model uses blockwise_attention when a layer's scores hold at least this many entries per (row, head), else
# the plain version above. Measured on this 2-core machine, 16 query / 8 kv heads, head_dim 128 (best of 5):
#   T × S          128²     512²     1024²    2048²    4096²     1 × 32768
#   plain          3.3 ms   38 ms    0.63 s   2.5 s    10.3 s    21 ms
#   blockwise      8.7 ms   43 ms    0.12 s   0.33 s   2.0 s     26 ms
# Below ~512² the Python loop over tiles costs more than it saves; above, skipping the future tiles (half of a
# causal square) and the mask on tiles wholly in the past make the blockwise version faster as well as bounded.
BLOCKWISE_MIN_SCORES = 1024 * 1024


@dataclass(frozen=True)
class CausalMask:
    """The mask `causal_mask(T, S)[None] & key_mask[:, None, :]`, without building it: one tile at a time.

    Queries are the last T of S positions (`past = S - T` come from the KV cache); `key_mask` [B, S] is False on
    left padding.

    >>> m = CausalMask(np.array([[False, True, True]]), past=1)
    >>> m.tile(0, 2, 0, 3).astype(int).tolist()
    [[[0, 1, 0], [0, 1, 1]]]
    """

    key_mask: np.ndarray  # [B, S] bool
    past: int

    @property
    def shape(self) -> tuple[int, int, int]:  # the [B, T, S] it stands for
        B, S = self.key_mask.shape
        return B, S - self.past, S

    def tile(self, t0: int, t1: int, s0: int, s1: int) -> np.ndarray:  # -> [B, t1 - t0, s1 - s0] bool
        causal = np.arange(s0, s1)[None, :] <= np.arange(self.past + t0, self.past + t1)[:, None]
        return causal[None] & self.key_mask[:, None, s0:s1]

    def tile_is_open(self, t0: int, t1: int, s0: int, s1: int) -> bool:
        """Every query of rows t0:t1 may see every key s0:s1 (no mask needed): no padding, all keys in the past."""
        return s1 - 1 <= self.past + t0 and bool(self.key_mask[:, s0:s1].all())

    def tile_is_closed(self, t0: int, t1: int, s0: int, s1: int) -> bool:
        """No query of rows t0:t1 may see any key s0:s1: the whole key block is in the future."""
        return s0 > self.past + t1 - 1

    def has_empty_rows(self) -> bool:
        """Some query sees no key at all (a padding query: nothing real at or before it)."""
        first_real = np.where(self.key_mask.any(axis=1), self.key_mask.argmax(axis=1), self.key_mask.shape[1])
        return bool((first_real > self.past).any())


def _tile(
    mask, t0: int, t1: int, s0: int, s1: int
) -> np.ndarray:  # a CausalMask or [B, T, S] bool -> [B, t, s]
    return mask.tile(t0, t1, s0, s1) if isinstance(mask, CausalMask) else mask[:, t0:t1, s0:s1]


def blockwise_attention(
    q: np.ndarray,
    k: np.ndarray,
    v: np.ndarray,
    mask,
    query_block: int = QUERY_BLOCK,
    key_block: int = KEY_BLOCK,
) -> np.ndarray:
    # [B, Hq, T, d], [B, Hkv, S, d] x2 (float32, float16 or bf16 bits), CausalMask or [B, T, S] bool -> [B, Hq, T, d]
    """`attention(q, k, v, mask)` one tile at a time, with an online softmax ("flash attention").

    For each block of queries, walk the key blocks keeping per query: m (largest score so far), l (sum of
    exp(score − m)) and acc (sum of exp(score − m) · v). A new block with a larger maximum m' rescales l and acc
    by exp(m − m'), so at the end acc / l is exactly softmax(scores) @ v, up to float32 rounding.

    Tiles wholly in the future are skipped (half the work of a causal prompt) — unless some query sees no key at
    all (left padding), because the plain version gives such a row the uniform average over *all* keys and we
    reproduce that.

    >>> rng = np.random.default_rng(0)
    >>> q, k, v = (rng.standard_normal((1, 4, 5, 8), np.float32) for _ in range(3))
    >>> k, v = k[:, :2], v[:, :2]
    >>> full = attention(q, k, v, causal_mask(5, 5)[None])
    >>> tiled = blockwise_attention(q, k, v, CausalMask(np.ones((1, 5), bool), 0), query_block=2, key_block=2)
    >>> bool(np.abs(full - tiled).max() < 1e-6)
    True
    """
    B, Hq, T, d = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    group = Hq // Hkv
    if isinstance(mask, CausalMask):
        skip_future = not mask.has_empty_rows()
    else:
        mask = np.asarray(mask, dtype=bool)
        skip_future = bool(mask.any(axis=-1).all())
    qg = q.reshape(B, Hkv, group, T, d) * np.float32(d**-0.5)  # scale the queries once, not every tile
    out = np.empty((B, Hkv, group, T, d), np.float32)
    for t0 in range(0, T, query_block):
        t1 = min(T, t0 + query_block)
        qt = qg[:, :, :, t0:t1]  # [B, Hkv, g, t, d]
        m = np.full((B, Hkv, group, t1 - t0, 1), MASKED, np.float32)  # running max
        l = np.zeros((B, Hkv, group, t1 - t0, 1), np.float32)  # noqa: E741  (running sum of exponentials)
        acc = np.zeros((B, Hkv, group, t1 - t0, d), np.float32)  # running sum of exp · v
        for s0 in range(0, S, key_block):
            s1 = min(S, s0 + key_block)
            if skip_future and _closed(mask, t0, t1, s0, s1):
                continue
            # [B, Hkv, 1, s, d]: a narrow cache is widened one block at a time
            kt, vt = widen(k[:, :, None, s0:s1]), widen(v[:, :, None, s0:s1])
            scores = qt @ kt.swapaxes(-1, -2)  # [B, Hkv, g, t, s]
            if not _open(mask, t0, t1, s0, s1):
                scores = np.where(_tile(mask, t0, t1, s0, s1)[:, None, None], scores, MASKED)
            m_new = np.maximum(m, scores.max(axis=-1, keepdims=True))
            correction = np.exp(m - m_new)  # rescale what was summed under the old maximum
            scores -= m_new
            p = np.exp(scores, out=scores)
            l = l * correction + p.sum(axis=-1, keepdims=True)  # noqa: E741
            acc = acc * correction + p @ vt
            m = m_new
        out[:, :, :, t0:t1] = acc / l
    return out.reshape(B, Hq, T, d)


def _closed(mask, t0: int, t1: int, s0: int, s1: int) -> bool:
    if isinstance(mask, CausalMask):
        return mask.tile_is_closed(t0, t1, s0, s1)
    return not mask[:, t0:t1, s0:s1].any()


def _open(mask, t0: int, t1: int, s0: int, s1: int) -> bool:
    if isinstance(mask, CausalMask):
        return mask.tile_is_open(t0, t1, s0, s1)
    return bool(mask[:, t0:t1, s0:s1].all())


def softmax_backward(dy: np.ndarray, y: np.ndarray, axis: int = -1) -> np.ndarray:  # [...], [...] -> [...]
    """dL/dx of y = softmax(x), given dL/dy and y itself: y ⊙ (dy − Σ_j dy_j·y_j).

    The Jacobian is diag(y) − y yᵀ; multiplying it by dy never needs it built. Shifting every input by the same
    constant leaves y unchanged, and accordingly the gradient sums to zero along `axis`.

    >>> y = softmax(np.array([0.0, 0.0])); softmax_backward(np.array([1.0, 0.0]), y).tolist()
    [0.25, -0.25]
    """
    return y * (dy - np.sum(dy * y, axis=axis, keepdims=True))


def attention_backward(
    dout: np.ndarray, q: np.ndarray, k: np.ndarray, v: np.ndarray, mask: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    # [B, Hq, T, d], [B, Hq, T, d], [B, Hkv, S, d], [B, Hkv, S, d], [B, T, S] -> dq, dk, dv (shapes of q, k, v)
    """Gradients of `attention` given dL/dout; recomputes the attention probabilities from q, k and the mask.

        scores = q kᵀ/√d (masked)   p = softmax(scores)   out = p v
        dv = pᵀ dout     dp = dout vᵀ     dscores = softmax_backward(dp, p)     dq = dscores k/√d   dk = dscoresᵀ q/√d

    A masked score has p = 0, so it gets no gradient. With GQA each kv head served a group of query heads: its
    dk and dv are the sums over that group (the same sum a broadcast in the forward turns into).
    """
    B, Hq, T, d = q.shape
    Hkv = k.shape[1]
    group = Hq // Hkv
    scale = d**-0.5
    qg = q.reshape(B, Hkv, group, T, d)
    dog = dout.reshape(B, Hkv, group, T, d)
    scores = (qg @ k[:, :, None].swapaxes(-1, -2)) * scale  # [B, Hkv, group, T, S]
    scores = np.where(mask[:, None, None], scores, MASKED)
    p = softmax(scores)
    dv = (p.swapaxes(-1, -2) @ dog).sum(axis=2)  # [B, Hkv, S, d]
    dscores = softmax_backward(dog @ v[:, :, None].swapaxes(-1, -2), p) * scale  # [B, Hkv, group, T, S]
    dq = (dscores @ k[:, :, None]).reshape(B, Hq, T, d)
    dk = (dscores.swapaxes(-1, -2) @ qg).sum(axis=2)  # [B, Hkv, S, d]
    return dq, dk, dv
