"""Chapter 10 solutions: tinyqwen's bf16 conversions (tinyqwen/safetensors.py), its config (tinyqwen/config.py)
for which layers are sparse, and the GEMV kernel the notebook writes (the production one is in `backends/`, the
numba backend).
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from tinyqwen.config import config_from_dict
from tinyqwen.safetensors import bf16_to_float32 as _widen
from tinyqwen.safetensors import float32_to_bf16 as _narrow


def bf16_to_float32(u16: np.ndarray) -> np.ndarray:
    return _widen(u16)


def float32_to_bf16(x: np.ndarray) -> np.ndarray:
    return _narrow(x)


def weights_per_token(config: dict) -> int:
    c = config_from_dict(config)
    h, d = c.hidden_size, c.head_dim
    attention = h * d * (2 * c.num_attention_heads + 2 * c.num_key_value_heads)  # q, o, k, v
    total = c.vocab_size * h  # the output head
    for layer in range(c.num_hidden_layers):
        if c.is_moe_layer(layer):
            mlp = c.num_experts * h + c.num_experts_per_tok * 3 * h * c.moe_intermediate_size
        else:
            mlp = 3 * h * c.intermediate_size
        total += attention + mlp
    return total


@njit(parallel=True, fastmath=True, cache=True)
def _gemv(w: np.ndarray, x: np.ndarray) -> np.ndarray:  # [m, n] uint16, [n] float32 -> [m] float32
    m, n = w.shape
    y = np.empty(m, np.float32)
    for block in prange((m + 63) // 64):
        wide = np.empty(n, np.uint32)
        row = wide.view(np.float32)
        for o in range(block * 64, min(m, block * 64 + 64)):
            for i in range(n):
                wide[i] = np.uint32(w[o, i]) << 16
            acc = np.float32(0.0)
            for i in range(n):
                acc += row[i] * x[i]
            y[o] = acc
    return y


def gemv_bf16(w: np.ndarray, x: np.ndarray) -> np.ndarray:
    return _gemv(np.ascontiguousarray(w, np.uint16), np.ascontiguousarray(x, np.float32))
