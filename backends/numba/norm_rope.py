"""RMSNorm (also QK-Norm: the same kernel over head_dim) and RoPE, each one pass with no temporaries.

Small kernels run on one thread: a parallel launch costs microseconds, and far more when the cores are shared
and the other thread waits to be scheduled; these touch kilobytes per decode step.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from tinyqwen.backends.numba.intrinsics import FAST
from tinyqwen.backends.numba.linear import _rows


@njit(cache=True, nogil=True, fastmath=FAST, error_model="numpy")
def _rms_norm(x, weight, eps, out):  # [R, d], [d], scalar -> out [R, d]
    R, d = x.shape
    for r in range(R):
        ss = np.float32(0.0)
        for j in range(d):
            ss += x[r, j] * x[r, j]
        scale = np.float32(1.0) / np.sqrt(ss / np.float32(d) + eps)
        for j in range(d):
            out[r, j] = x[r, j] * scale * weight[j]


@njit(cache=True, nogil=True)
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
