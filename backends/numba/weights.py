"""The numba backend's weights: bf16 matrices stay bf16 (`BF16Weight`, uint16 bit patterns), and the embedding
lookup widens only the rows it reads.
"""

from __future__ import annotations

import numpy as np

from tinyqwen.bf16 import bf16_to_float32


class BF16Weight:
    """A bf16 weight kept as its uint16 bit patterns (`.bits`); the backend's kernels read them directly.

    `np.asarray(w)` widens all of it (tests, plots); the embedding lookup widens only the rows it picks (`embed`).
    """

    def __init__(self, bits: np.ndarray):
        if bits.dtype != np.uint16:
            raise TypeError(f"BF16Weight holds uint16 bit patterns, got {bits.dtype}")
        self.bits = bits

    shape = property(lambda self: self.bits.shape)
    ndim = property(lambda self: self.bits.ndim)
    nbytes = property(lambda self: self.bits.nbytes)
    dtype = np.dtype(np.float32)  # what it stands for

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        return bf16_to_float32(self.bits).astype(dtype or np.float32, copy=False)

    def __repr__(self) -> str:
        return f"BF16Weight(shape={self.shape})"


def embed(table, ids: np.ndarray) -> np.ndarray:  # [V, H], [B, T] ids -> [B, T, H] float32
    """The rows of `ids`, widened: a bf16 table is widened only where it is read.

    >>> embed(BF16Weight(np.array([[0x3F80, 0xC000], [0x3FC0, 0x0000]], dtype=np.uint16)), np.array([1, 0]))
    array([[ 1.5,  0. ],
           [ 1. , -2. ]], dtype=float32)
    """
    if isinstance(table, BF16Weight):
        return bf16_to_float32(table.bits[ids])
    return table[ids]


def prepare(w: np.ndarray):
    """Checkpoint tensor -> the backend's weight: bf16 matrices stay bf16, vectors (norm weights) become float32."""
    if w.dtype == np.uint16:
        return BF16Weight(w) if w.ndim >= 2 else bf16_to_float32(w)
    return w  # float32: the read-only memory map, as loaded
