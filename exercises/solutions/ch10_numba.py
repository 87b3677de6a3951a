"""Chapter 10 solutions: tinyqwen's bf16 conversions (tinyqwen/safetensors.py), its config (tinyqwen/config.py)
for which layers are sparse, and the numba backend's bf16 GEMV (`backends/numba/linear.py`).
"""

from __future__ import annotations

import numpy as np

from tinyqwen.backends.numba.linear import linear
from tinyqwen.backends.numba.weights import BF16Weight
from tinyqwen.bf16 import bf16_to_float32 as _widen
from tinyqwen.bf16 import float32_to_bf16 as _narrow
from tinyqwen.config import config_from_dict


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


def gemv_bf16(w: np.ndarray, x: np.ndarray) -> np.ndarray:
    # the production kernel: backends/numba/linear.py's bf16 GEMV (one token takes its GEMV path)
    return linear(np.ascontiguousarray(x, np.float32), BF16Weight(np.ascontiguousarray(w, np.uint16)))
