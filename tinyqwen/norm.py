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
    # always in float32: bf16 squares of activations lose too much precision (transformers upcasts too);
    # float64 stays float64, for the finite-difference gradient checks of chapter 13
    if x.dtype != np.float64:
        x = x.astype(np.float32, copy=False)
    variance = np.mean(x * x, axis=-1, keepdims=True)
    return (x / np.sqrt(variance + np.float32(eps))) * weight


def rms_norm_backward(
    dy: np.ndarray, x: np.ndarray, weight: np.ndarray, eps: float
) -> tuple[np.ndarray, np.ndarray]:  # [..., d], [..., d], [d] -> dx [..., d], dweight [d]
    """Gradients of `rms_norm` given dL/dy: (dL/dx, dL/dweight). Recomputes the forward's statistics.

    With r = 1/sqrt(mean(x²) + eps) and x̂ = x·r (so y = x̂ ⊙ w), the chain rule through r gives

        g  = dy ⊙ w                             (back through the weight)
        dx = r · (g − x̂ · mean(g ⊙ x̂))          (the second term: every x_j moves r, which scales all outputs)
        dw = Σ over tokens of dy ⊙ x̂

    A LayerNorm backward would also subtract mean(g): RMSNorm never subtracted the mean, so neither does this.

    >>> x = np.array([[3.0, 4.0]]); dx, dw = rms_norm_backward(np.array([[1.0, 0.0]]), x, np.ones(2), eps=0.0)
    >>> dx.round(4).tolist(), dw.round(4).tolist()
    ([[0.181, -0.1358]], [0.8485, 0.0])
    """
    r = 1.0 / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps)  # [..., 1]
    x_hat = x * r
    g = dy * weight
    dx = r * (g - x_hat * np.mean(g * x_hat, axis=-1, keepdims=True))
    dweight = (dy * x_hat).reshape(-1, x.shape[-1]).sum(axis=0)
    return dx, dweight
