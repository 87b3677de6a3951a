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
"""

from __future__ import annotations

import numpy as np

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


def attention(q: np.ndarray, k: np.ndarray, v: np.ndarray, mask: np.ndarray) -> np.ndarray:
    # [B, Hq, T, d], [B, Hkv, S, d], [B, Hkv, S, d], [B, T, S] bool -> [B, Hq, T, d]
    B, Hq, T, d = q.shape
    Hkv = k.shape[1]
    group = Hq // Hkv
    # query head h uses kv head h // group: view the queries as [B, Hkv, group, T, d] and broadcast k, v
    qg = q.reshape(B, Hkv, group, T, d)
    scores = (qg @ k[:, :, None].swapaxes(-1, -2)) * np.float32(d**-0.5)  # [B, Hkv, group, T, S]
    scores = np.where(mask[:, None, None], scores, MASKED)
    out = softmax(scores) @ v[:, :, None]  # [B, Hkv, group, T, d]
    return out.reshape(B, Hq, T, d)


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
