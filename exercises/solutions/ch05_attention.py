"""Chapter 5 solutions: thin adapters to tinyqwen's own attention (tinyqwen/attention.py), so solutions mode grades it."""

from __future__ import annotations

import numpy as np

from tinyqwen import attention as _attention


def softmax(x: np.ndarray, axis: int = -1) -> np.ndarray:  # [...] -> [...]
    return _attention.softmax(x, axis=axis)


def causal_mask(n_q: int, n_k: int) -> np.ndarray:  # -> [n_q, n_k] bool
    return _attention.causal_mask(n_q, n_k)


def attention(q: np.ndarray, k: np.ndarray, v: np.ndarray, mask: np.ndarray) -> np.ndarray:
    # [B, Hq, T, d], [B, Hkv, S, d] x2, [B, T, S] bool -> [B, Hq, T, d]
    return _attention.attention(q, k, v, mask)
