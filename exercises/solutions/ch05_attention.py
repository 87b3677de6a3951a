"""Chapter 5 solutions: softmax, the causal mask and grouped-query attention, written out (tinyqwen/attention.py
is the library's, with a blockwise version for long prompts that this chapter does not need)."""

from __future__ import annotations

import numpy as np


def softmax(x: np.ndarray, axis: int = -1) -> np.ndarray:  # [...] -> [...]
    e = np.exp(x - np.max(x, axis=axis, keepdims=True))  # subtract the max: exp never overflows
    return e / np.sum(e, axis=axis, keepdims=True)


def causal_mask(n_q: int, n_k: int) -> np.ndarray:  # -> [n_q, n_k] bool
    # the queries are the LAST n_q of the n_k positions (earlier keys came from a cache): query i sits at
    # position n_k - n_q + i and may see every key at or before it
    query_pos = np.arange(n_k - n_q, n_k)[:, None]  # [n_q, 1]
    key_pos = np.arange(n_k)[None, :]  # [1, n_k]
    return key_pos <= query_pos


def attention(q: np.ndarray, k: np.ndarray, v: np.ndarray, mask: np.ndarray) -> np.ndarray:
    # [B, Hq, T, d], [B, Hkv, S, d] x2, [B, T, S] bool -> [B, Hq, T, d]
    B, Hq, T, d = q.shape
    Hkv = k.shape[1]
    group = Hq // Hkv  # query heads per kv head: head h reads kv head h // group (consecutive heads share)
    qg = q.reshape(B, Hkv, group, T, d)  # [B, Hkv, group, T, d]
    scores = qg @ k[:, :, None].swapaxes(-1, -2) / np.sqrt(np.float32(d))  # [B, Hkv, group, T, S]
    # the most negative float32, not -inf: a row with every key masked (padding) stays finite
    scores = np.where(mask[:, None, None], scores, np.finfo(np.float32).min)
    out = softmax(scores, axis=-1) @ v[:, :, None]  # [B, Hkv, group, T, d] softmax over the keys
    return out.reshape(B, Hq, T, d)
