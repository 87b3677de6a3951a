"""Chapter 5 exercises: softmax, the causal mask, and grouped-query attention.

Work through notebooks/05-attention.ipynb, then fill in each function below, in order, and grade them with

    pytest exercises/test_ch05_attention.py

Everything is NumPy in float32. Shapes follow transformers: queries [batch, q_heads, T, head_dim], keys and values
[batch, kv_heads, S, head_dim] with kv_heads dividing q_heads (grouped-query attention). Masks are boolean, True where
a query may look at a key.
"""

from __future__ import annotations

import numpy as np


def softmax(x: np.ndarray, axis: int = -1) -> np.ndarray:  # [...] -> [...], same shape
    """exp(x) / sum(exp(x)) along `axis`, computed so that it never overflows.

    exp(89) is already inf in float32: subtract the maximum along `axis` first (softmax does not change when every
    entry moves by the same amount). A row whose entries are all float32's most negative value (a fully masked row)
    must come out uniform, not NaN.

    >>> softmax(np.array([1.0, 2.0, 3.0], dtype=np.float32)).round(4)
    array([0.09  , 0.2447, 0.6652], dtype=float32)
    >>> softmax(np.array([1000.0, 1001.0], dtype=np.float32)).round(4)
    array([0.2689, 0.7311], dtype=float32)
    >>> softmax(np.array([[1.0, 1.0], [0.0, 2.0]], dtype=np.float32), axis=0).round(4)  # each column sums to 1
    array([[0.7311, 0.2689],
           [0.2689, 0.7311]], dtype=float32)
    """
    raise NotImplementedError


def causal_mask(n_q: int, n_k: int) -> np.ndarray:  # -> [n_q, n_k] bool
    """True where query i may look at key j: keys at its own position and before it.

    The queries are the *last* n_q of the n_k positions (with a KV cache, the first n_k - n_q keys come from the
    cache), so query i sits at position i + (n_k - n_q).

    >>> causal_mask(3, 3).astype(int)
    array([[1, 0, 0],
           [1, 1, 0],
           [1, 1, 1]])
    >>> causal_mask(2, 4).astype(int)
    array([[1, 1, 1, 0],
           [1, 1, 1, 1]])
    """
    raise NotImplementedError


def attention(q: np.ndarray, k: np.ndarray, v: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Grouped-query attention: softmax(q kᵀ / sqrt(head_dim), masked) v for every query head.

    q [B, Hq, T, d], k and v [B, Hkv, S, d], mask [B, T, S] bool (True = may attend) -> [B, Hq, T, d].
    Query head h uses kv head h // (Hq // Hkv). Where the mask is False the score becomes float32's most negative
    value (np.finfo(np.float32).min), so a query that may see no key at all gets the plain average of the values.

    One head, d = 4 (scale 1/2): query 0 sees only key 0; query 1 scores the keys 0 and 2·ln3/2 = ln 3, so it takes
    1/4 of value 0 and 3/4 of value 1:

    >>> q = np.array([[2.0, 0, 0, 0], [2.0, 0, 0, 0]], dtype=np.float32).reshape(1, 1, 2, 4)
    >>> k = np.array([[0.0, 0, 0, 0], [np.log(3), 0, 0, 0]], dtype=np.float32).reshape(1, 1, 2, 4)
    >>> v = np.array([[4.0, 0, 0, 0], [0, 4.0, 0, 0]], dtype=np.float32).reshape(1, 1, 2, 4)
    >>> attention(q, k, v, causal_mask(2, 2)[None]).round(4)
    array([[[[4., 0., 0., 0.],
             [1., 3., 0., 0.]]]], dtype=float32)
    """
    raise NotImplementedError
