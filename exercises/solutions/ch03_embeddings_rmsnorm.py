"""Chapter 3 solutions: the embedding lookup and RMSNorm, written out (tinyqwen/norm.py is the library's)."""

from __future__ import annotations

import numpy as np


def embed(ids: np.ndarray, table: np.ndarray) -> np.ndarray:  # [B, T] int, [vocab, d] -> [B, T, d]
    ids = np.asarray(ids)
    # NumPy would accept -1 (the last row) silently: an id outside the table is a bug upstream, say so
    if ids.size and (ids.min() < 0 or ids.max() >= table.shape[0]):
        bad = int(ids.min()) if ids.min() < 0 else int(ids.max())
        raise IndexError(f"token id {bad} is outside [0, {table.shape[0]})")
    return table[ids]  # one row of the table per id: a lookup, no arithmetic


def rms_norm(x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:  # [..., d], [d] -> [..., d]
    x = np.asarray(x, dtype=np.float32)  # squares in float32, as transformers upcasts before the mean
    ms = np.mean(
        x * x, axis=-1, keepdims=True
    )  # [..., 1] mean square; no mean subtracted (that is LayerNorm)
    return x / np.sqrt(ms + np.float32(eps)) * weight  # eps inside the root; the weight is a per-channel gain
