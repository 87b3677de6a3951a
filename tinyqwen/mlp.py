"""The SwiGLU feed-forward block.

    mlp(x) = down( silu(gate(x)) * up(x) )        silu(z) = z * sigmoid(z)

Two parallel projections up to `intermediate_size`: `gate` goes through SiLU and acts as a soft, per-channel switch
on `up`; `down` projects back to `hidden_size`. Qwen3 has no biases in these projections.

>>> import numpy as np
>>> round(float(silu(np.float32(1.0))), 4)   # 1 * sigmoid(1)
0.7311
"""

import numpy as np

from tinyqwen.quantization import QuantizedTensor

# rows of a quantized weight widened at once: 8192 x 1024 float32 is 32 MiB, whatever the matrix (a 151,936-row
# lm_head would be 622 MB in one piece)
QUANTIZED_ROWS = 8192


def silu(z: np.ndarray) -> np.ndarray:  # [...] -> [...]
    # written as z / (1 + exp(-z)) so large negative z gives 0 instead of overflow warnings in z * sigmoid(z)
    with np.errstate(over="ignore", under="ignore"):
        return z / (np.float32(1.0) + np.exp(-z))


def linear(x: np.ndarray, w: np.ndarray) -> np.ndarray:  # [..., d_in], [d_out, d_in] -> [..., d_out]
    # weights stay in the checkpoint's [out, in] layout; BLAS reads the transpose without a copy
    if isinstance(w, QuantizedTensor):
        return quantized_linear(x, w)
    return x @ w.T


def quantized_linear(x: np.ndarray, w: QuantizedTensor) -> np.ndarray:  # [..., d_in], blocks [d_out, d_in]
    """The reference for a quantized weight: widen its blocks to float32 (llama.cpp's exact values), a slab of rows
    at a time, and multiply in float32. Slow and simple: the quantized kernels live in the numba backend."""
    rows = w.shape[0]
    if rows <= QUANTIZED_ROWS:
        return x @ w.dequantize().T
    out = np.empty((*x.shape[:-1], rows), np.float32)
    for r in range(0, rows, QUANTIZED_ROWS):
        out[..., r : r + QUANTIZED_ROWS] = x @ w[r : r + QUANTIZED_ROWS].dequantize().T
    return out


def swiglu(x: np.ndarray, w_gate: np.ndarray, w_up: np.ndarray, w_down: np.ndarray) -> np.ndarray:
    # [..., d], [f, d], [f, d], [d, f] -> [..., d]
    return linear(silu(linear(x, w_gate)) * linear(x, w_up), w_down)


def linear_backward(
    dy: np.ndarray, x: np.ndarray, w: np.ndarray
) -> tuple[
    np.ndarray, np.ndarray
]:  # [..., d_out], [..., d_in], [d_out, d_in] -> dx [..., d_in], dw [d_out, d_in]
    """y = x @ wᵀ, so dx = dy @ w and dw = dyᵀ @ x summed over every leading (batch, time) position.

    >>> dx, dw = linear_backward(np.ones((1, 2)), np.array([[1.0, 2.0, 3.0]]), np.zeros((2, 3)))
    >>> dx.tolist(), dw.tolist()
    ([[0.0, 0.0, 0.0]], [[1.0, 2.0, 3.0], [1.0, 2.0, 3.0]])
    """
    dw = dy.reshape(-1, dy.shape[-1]).T @ x.reshape(-1, x.shape[-1])
    return dy @ w, dw


def silu_backward(dy: np.ndarray, z: np.ndarray) -> np.ndarray:  # [...], [...] -> [...]
    """d silu(z)/dz = σ(z) + z·σ(z)·(1 − σ(z)) = σ(z)·(1 + z·(1 − σ(z))).

    >>> round(float(silu_backward(np.float64(1.0), np.float64(0.0))), 4)   # σ(0) = 0.5
    0.5
    """
    with np.errstate(over="ignore", under="ignore"):
        sig = 1.0 / (1.0 + np.exp(-z))
    return dy * sig * (1.0 + z * (1.0 - sig))


def swiglu_backward(
    dy: np.ndarray, x: np.ndarray, w_gate: np.ndarray, w_up: np.ndarray, w_down: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    # [..., d], [..., d], [f, d], [f, d], [d, f] -> dx [..., d], dw_gate [f, d], dw_up [f, d], dw_down [d, f]
    """Gradients of `swiglu` given dL/dy (recomputes the two projections; they are cheap next to storing them).

    h = silu(a) ⊙ b with a = gate(x), b = up(x): the product rule sends dh ⊙ b back through the SiLU into `a`,
    and dh ⊙ silu(a) into `b`; x gets the sum of what flows back through both projections.
    """
    a, b = linear(x, w_gate), linear(x, w_up)
    s = silu(a)
    dh, dw_down = linear_backward(dy, s * b, w_down)
    dx_gate, dw_gate = linear_backward(silu_backward(dh * b, a), x, w_gate)
    dx_up, dw_up = linear_backward(dh * s, x, w_up)
    return dx_gate + dx_up, dw_gate, dw_up, dw_down
