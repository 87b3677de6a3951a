"""The SwiGLU feed-forward block.

    mlp(x) = down( silu(gate(x)) * up(x) )        silu(z) = z * sigmoid(z)

Two parallel projections up to `intermediate_size`: `gate` goes through SiLU and acts as a soft, per-channel switch
on `up`; `down` projects back to `hidden_size`. Qwen3 has no biases in these projections.

>>> import numpy as np
>>> round(float(silu(np.float32(1.0))), 4)   # 1 * sigmoid(1)
0.7311
"""

import numpy as np


def silu(z: np.ndarray) -> np.ndarray:  # [...] -> [...]
    # written as z / (1 + exp(-z)) so large negative z gives 0 instead of overflow warnings in z * sigmoid(z)
    with np.errstate(over="ignore", under="ignore"):
        return z / (np.float32(1.0) + np.exp(-z))


def linear(x: np.ndarray, w: np.ndarray) -> np.ndarray:  # [..., d_in], [d_out, d_in] -> [..., d_out]
    # weights stay in the checkpoint's [out, in] layout; BLAS reads the transpose without a copy
    return x @ w.T


def swiglu(x: np.ndarray, w_gate: np.ndarray, w_up: np.ndarray, w_down: np.ndarray) -> np.ndarray:
    # [..., d], [f, d], [f, d], [d, f] -> [..., d]
    return linear(silu(linear(x, w_gate)) * linear(x, w_up), w_down)
