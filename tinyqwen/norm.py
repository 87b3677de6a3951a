"""RMSNorm: scale each vector to unit root-mean-square, then by a learned per-channel weight.

    rms_norm(x) = x / sqrt(mean(x**2) + eps) * weight

Unlike LayerNorm there is no mean subtraction and no bias. Qwen3 uses it in four places: before attention, before
the MLP, at the very end, and (new in Qwen3) on every query and key head — "QK-Norm" — over head_dim only.

>>> import numpy as np
>>> rms_norm(np.array([3.0, 4.0], dtype=np.float32), np.ones(2, dtype=np.float32), eps=0.0).round(4)
array([0.8485, 1.1314], dtype=float32)

(the RMS of [3, 4] is sqrt(12.5) = 3.5355, and 3 / 3.5355 = 0.8485.)
"""

import numpy as np


def rms_norm(x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:  # [..., d], [d] -> [..., d]
    # always in float32: bf16 squares of activations lose too much precision (transformers upcasts too)
    x = x.astype(np.float32, copy=False)
    variance = np.mean(x * x, axis=-1, keepdims=True)
    return (x / np.sqrt(variance + np.float32(eps))) * weight
