"""The numba backend's weights: bf16 matrices stay bf16 (`BF16Weight`, uint16 bit patterns), GGUF's quantized
matrices stay in their blocks (`QuantWeight`), and the embedding lookup widens only the rows it reads.
"""

from __future__ import annotations

import numpy as np

from tinyqwen.backends.numba import quant
from tinyqwen.bf16 import bf16_to_float32
from tinyqwen.quantization import BLOCK_BYTES, BLOCK_VALUES


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


class QuantWeight:
    """A weight in GGUF's quantized blocks (q8_0, q4_k, q6_k), as `tinyqwen.quantization.QuantizedTensor` holds it.

    `.data` [..., N, N·bytes/values] uint8: each row's blocks in order (a read-only view of the file's bytes, never
    copied or widened whole); `.data8` the same bytes as int8 (the codes the kernels read signed); `.kind` the
    kernels' number for the format; `.shape` the matrix it stands for ([E, N, K] for stacked experts).
    `np.asarray(w)` widens all of it (tests); `w[e]` is expert e of a stack.
    """

    def __init__(self, qtype: str, data: np.ndarray):
        if qtype not in quant.KINDS:
            raise TypeError(
                f"QuantWeight: unsupported block format {qtype!r} (supported: {', '.join(quant.KINDS)})"
            )
        values, nbytes = BLOCK_VALUES[qtype], BLOCK_BYTES[qtype]
        if data.dtype != np.uint8 or data.ndim < 2 or data.shape[-1] % nbytes:
            raise ValueError(
                f"QuantWeight: {qtype} data must be uint8 [..., rows, k·{nbytes}], got {data.dtype} {data.shape}"
            )
        data = np.ascontiguousarray(data).view()  # a view of the file's map (a copy only if it was strided)
        data.flags.writeable = False  # one Numba type for every weight: read-only, as the file's memory map
        self.qtype, self.kind, self.data, self.data8 = qtype, quant.KINDS[qtype], data, data.view(np.int8)
        self.shape = (*data.shape[:-1], data.shape[-1] // nbytes * values)

    ndim = property(lambda self: len(self.shape))
    nbytes = property(lambda self: self.data.nbytes)
    dtype = np.dtype(np.float32)  # what it stands for

    def __getitem__(self, e: int) -> QuantWeight:  # expert e of a stacked [E, N, K] weight
        return QuantWeight(self.qtype, self.data[e])

    def rows(self, ids: np.ndarray) -> np.ndarray:  # [R] row ids -> [R, K] float32, only those rows widened
        ids = np.asarray(ids, np.int64).reshape(-1)
        out = np.empty((ids.shape[0], self.shape[-1]), np.float32)
        quant.dequantize_rows(self.kind, self.data, self.data8, ids, out)
        return out

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        flat = QuantWeight(self.qtype, self.data.reshape(-1, self.data.shape[-1]))
        return flat.rows(np.arange(flat.shape[0])).reshape(self.shape).astype(dtype or np.float32, copy=False)

    def __repr__(self) -> str:
        return f"QuantWeight({self.qtype}, shape={self.shape})"


def embed(table, ids: np.ndarray) -> np.ndarray:  # [V, H], [B, T] ids -> [B, T, H] float32
    """The rows of `ids`, widened: a bf16 table is widened only where it is read.

    >>> embed(BF16Weight(np.array([[0x3F80, 0xC000], [0x3FC0, 0x0000]], dtype=np.uint16)), np.array([1, 0]))
    array([[ 1.5,  0. ],
           [ 1. , -2. ]], dtype=float32)
    """
    if isinstance(table, BF16Weight):
        return bf16_to_float32(table.bits[ids])
    if isinstance(table, QuantWeight):  # only the rows read are dequantized
        return table.rows(ids).reshape(*np.shape(ids), table.shape[-1])
    return table[ids]


def prepare(w: np.ndarray):
    """Checkpoint tensor -> the backend's weight: bf16 matrices stay bf16, quantized ones (a `QuantizedTensor` of
    a GGUF file) stay in their blocks, vectors (norm weights) become float32."""
    if hasattr(w, "qtype"):  # tinyqwen.quantization.QuantizedTensor
        weight = QuantWeight(w.qtype, w.data)
        if tuple(weight.shape[-2:]) != tuple(w.shape[-2:]):
            raise ValueError(f"quantized weight: blocks hold shape {weight.shape}, the tensor says {w.shape}")
        return weight
    if w.dtype == np.uint16:
        return BF16Weight(w) if w.ndim >= 2 else bf16_to_float32(w)
    return w  # float32: the read-only memory map, as loaded
