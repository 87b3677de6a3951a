"""Chapter 10 solutions: bfloat16 by hand and a parallel Numba GEMV that reads 2-byte weights, written out
(tinyqwen/bf16.py and backends/numba/linear.py are the library's versions; the latter tiles and fuses more)."""

from __future__ import annotations

import numba
import numpy as np


def bf16_to_float32(u16: np.ndarray) -> np.ndarray:  # [...] uint16 -> [...] float32
    # the 16 bits become the top half of a float32: widen, shift, reinterpret (.view, never .astype)
    return (np.asarray(u16, dtype=np.uint16).astype(np.uint32) << 16).view(np.float32)


def float32_to_bf16(x: np.ndarray) -> np.ndarray:  # [...] float32 -> [...] uint16
    bits = (
        np.asarray(x, dtype=np.float32).view(np.uint32).astype(np.uint64)
    )  # uint64: the sum below cannot wrap
    lowest_kept = (bits >> 16) & 1  # 1 when truncating would leave an odd pattern
    # + 0x7FFF carries into bit 16 exactly when the dropped half is above 0x8000; + the kept bit sends a tie
    # (exactly 0x8000) to the even neighbour. Overflow carries into the exponent: inf, as it should
    return ((bits + 0x7FFF + lowest_kept) >> 16).astype(np.uint16)


def weights_per_token(config: dict) -> int:
    c = config
    h, d = c["hidden_size"], c["head_dim"]
    attention = h * d * (2 * c["num_attention_heads"] + 2 * c["num_key_value_heads"])  # q, o; k, v
    E = c.get("num_experts", 0)
    total = c["vocab_size"] * h  # the output head: read every token, tied or not
    for i in range(c["num_hidden_layers"]):
        sparse = (
            E > 0 and i not in c.get("mlp_only_layers", []) and (i + 1) % c.get("decoder_sparse_step", 1) == 0
        )
        if sparse:  # the router, then only the experts it picked: what "active parameters" means
            mlp = E * h + c["num_experts_per_tok"] * 3 * h * c["moe_intermediate_size"]
        else:
            mlp = 3 * h * c["intermediate_size"]
        total += attention + mlp
    return total


ROWS_PER_BLOCK = (
    64  # one scratch buffer per block of rows: an allocation per row would cost more than the row
)


@numba.njit(parallel=True, fastmath=True, cache=True)
def gemv_bf16(w: np.ndarray, x: np.ndarray) -> np.ndarray:  # [m, n] uint16, [n] float32 -> [m] float32
    m, n = w.shape
    y = np.empty(m, dtype=np.float32)
    n_blocks = (m + ROWS_PER_BLOCK - 1) // ROWS_PER_BLOCK
    for b in numba.prange(n_blocks):  # blocks of rows over the threads: each writes its own rows of y
        wide = np.empty(n, dtype=np.uint32)  # scratch: one row's patterns widened to 32 bits
        wide_f = wide.view(np.float32)  # ... and read as float32 (Numba cannot view one scalar's bits)
        for o in range(b * ROWS_PER_BLOCK, min((b + 1) * ROWS_PER_BLOCK, m)):
            for i in range(n):
                wide[i] = np.uint32(w[o, i]) << 16
            acc = np.float32(0.0)
            for i in range(n):
                acc += wide_f[i] * x[i]
            y[o] = acc
    return y
