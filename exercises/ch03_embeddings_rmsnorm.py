"""Chapter 3 · Embeddings and RMSNorm: the first step of the network, and its most frequent operation.

Work through notebooks/03-embeddings-rmsnorm.ipynb, then replace each `raise NotImplementedError` below, in order.
Grade with `pytest exercises/test_ch03_embeddings_rmsnorm.py`. The last checkpoint runs the real model with your
`embed` as its embedding lookup and your `rms_norm` as every one of its norms.
"""

from __future__ import annotations

import numpy as np


def embed(ids: np.ndarray, table: np.ndarray) -> np.ndarray:  # [...] int, [V, H] -> [..., H]
    """The embedding of every token id: row `ids[...]` of `table`, for ids of any shape.

    ids of shape [T] give [T, H]; a batch [B, T] gives [B, T, H]. The values are the table's, unchanged (same
    dtype). An id outside [0, V) must raise an error (IndexError or ValueError). Careful: NumPy silently reads
    table[-1] as the last row.

    Example: table = np.arange(6.0).reshape(3, 2)          # 3 tokens, H = 2
             embed(np.array([2, 0, 2]), table) -> [[4., 5.], [0., 1.], [4., 5.]]
             embed(np.array([[1], [2]]), table).shape == (2, 1, 2)
             embed(np.array([-1]), table) raises IndexError
    """
    raise NotImplementedError


def rms_norm(x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:  # [..., d], [d] -> [..., d]
    """RMSNorm over the last axis: x / sqrt(mean(x**2) + eps) * weight, computed and returned in float32.

    Every vector along the last axis is normalised on its own (a [B, T, d] batch is B·T separate vectors; for
    QK-Norm, x is [B, T, heads, head_dim] and weight is [head_dim]). There is no mean subtraction (that would be
    LayerNorm) and no bias. eps goes inside the square root. x may be float16: convert it to float32 first,
    because float16 squares overflow above 256.

    Example: rms_norm(np.array([3.0, 4.0]), np.ones(2), eps=0.0) -> array([0.8485, 1.1314], dtype=float32)
             (the RMS of [3, 4] is sqrt((9 + 16) / 2) = 3.5355, and 3 / 3.5355 = 0.8485)
    """
    raise NotImplementedError
