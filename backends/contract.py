"""The Backend contract: the kernels a backend supplies, as one frozen dataclass (see `tinyqwen.backends`).

This module is the bottom of the backends' layer: the model, generation and every backend import it; it imports
nothing of theirs, so a backend can never pull the model (or the model a backend) into an import circle.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

# what a device sampler is told per row: finished, or choose (any other value: take this forced id)
FINISHED, CHOOSE = -2, -1


def _reference_blockwise_attention(q, k, v, mask):
    from tinyqwen.attention import blockwise_attention

    return blockwise_attention(q, k, v, mask)


@dataclass(frozen=True)
class Backend:
    name: str
    linear: Callable
    rms_norm: Callable
    apply_rope: Callable
    attention: Callable
    swiglu: Callable
    moe_block: Callable
    prepare: Callable[[np.ndarray], object]
    to_numpy: Callable[[object], np.ndarray]
    keep_bf16: bool = False
    bf16_in_memory: bool = False  # with keep_bf16: read bf16 tensors into process memory, not the file's map
    matmul_precision: str = "highest"  # "medium": products with bf16 weights take bf16-rounded inputs (numba)
    # zeros(shape, dtype) -> the backend's array: the KV cache is allocated with it (device memory for cupy)
    zeros: Callable = np.zeros
    # optional fused kernel for several products of one input (q, k and v): one pass instead of three
    linears: Callable | None = None
    # long prompts: tile-by-tile attention; a backend without its own uses the NumPy reference's
    blockwise_attention: Callable = _reference_blockwise_attention

    def linear_many(self, x, ws: tuple) -> tuple:  # [..., d_in], n x [d_out_i, d_in] -> n x [..., d_out_i]
        """`tuple(self.linear(x, w) for w in ws)`, through the backend's fused `linears` kernel when it has one."""
        if self.linears is not None:
            return self.linears(x, ws)
        return tuple(
            self.linear(x, w) for w in ws
        )  # "medium": products with bf16 weights take bf16-rounded inputs (numba)
