"""Chapter 10 · Making it fast on the CPU: bfloat16 weights and a parallel GEMV kernel that reads them.

Work through notebooks/10-numba.ipynb, then replace each `raise NotImplementedError` below, in order.
Grade with `pytest exercises/test_ch10_numba.py`. Grading checks correctness only, never speed. The last checkpoint
runs the bf16 fixture model with every matrix product on your `gemv_bf16`.

Numba (`pip install numba`) compiles `gemv_bf16`: decorate it with `@numba.njit(parallel=True, fastmath=True)` and
loop over output rows with `numba.prange`.
"""

from __future__ import annotations

import numpy as np


def bf16_to_float32(u16: np.ndarray) -> np.ndarray:  # [...] uint16 bit patterns -> [...] float32
    """Widen bfloat16 bit patterns to float32, exactly: the 16 bits become the top half of a float32.

    Put each pattern in a uint32, shift it left by 16 and reinterpret (`.view`) the 32 bits as float32. Converting
    the integer (`u16.astype(np.float32)`) gives the pattern's *value* as a number, not the float it encodes.
    Same shape as the input; every bf16 value is exactly a float32 value, so nothing is rounded.

    Example: bf16_to_float32(np.array([0x3F80, 0xC000, 0x7F80], dtype=np.uint16)) -> array([ 1., -2., inf], float32)
             (0x3F80 -> 0x3F800000 = 1.0: sign 0, exponent 127, mantissa 0)
    """
    raise NotImplementedError


def float32_to_bf16(x: np.ndarray) -> np.ndarray:  # [...] float32 -> [...] uint16 bit patterns
    """Round float32 values to the nearest bfloat16 and return its bit patterns; ties go to the even pattern.

    Keeping the top 16 bits truncates (rounds toward zero). Round to nearest instead: add 0x7FFF plus the lowest
    kept bit (bit 16) to the 32-bit pattern before dropping the low half. Do the addition in a wider integer
    (uint64), or patterns near the top overflow. Overflow must round to ±inf, as torch does. (NaN is not graded.)

    Example: [hex(b) for b in float32_to_bf16(np.array([1.0, 1 + 2**-8, 1 + 3 * 2**-8, 1 + 1.5 * 2**-8], np.float32))]
             -> ['0x3f80', '0x3f80', '0x3f82', '0x3f81']
             (1 + 2**-8 is 0x3F808000: a tie between 0x3F80 and 0x3F81, to the even 0x3F80; 1 + 3 * 2**-8 is a tie
             between 0x3F81 and 0x3F82, to 0x3F82; 1 + 1.5 * 2**-8 is 0x3F80C000, above half: up to 0x3F81)
    """
    raise NotImplementedError


def weights_per_token(config: dict) -> int:
    """How many weights one decode step reads: every weight matrix it multiplies by a vector.

    Per layer: q_proj, k_proj, v_proj, o_proj (num_attention_heads·head_dim or num_key_value_heads·head_dim rows or
    columns, by hidden_size), then the MLP. A dense layer has gate_proj, up_proj ([intermediate_size, hidden_size])
    and down_proj ([hidden_size, intermediate_size]). A sparse (MoE) layer has the router ([num_experts,
    hidden_size]) and only the num_experts_per_tok experts the router picked, each with three
    [moe_intermediate_size, hidden_size]-sized matrices. A layer i is sparse when num_experts > 0, i is not in
    mlp_only_layers and (i + 1) % decoder_sparse_step == 0. After the last layer comes the output head,
    [vocab_size, hidden_size], tied or not (tied, it is the embedding matrix, read once per token). Leave out the
    norms and the embedding lookup (one row).

    Example: Qwen3-0.6B (hidden 1024, head_dim 128, 16 and 8 heads, intermediate 3072, 28 layers, vocab 151936):
             28 · (1024·128·(2·16 + 2·8) + 3·1024·3072) + 151936·1024 = 595,984,384
    """
    raise NotImplementedError


def gemv_bf16(w: np.ndarray, x: np.ndarray) -> np.ndarray:  # [m, n] uint16, [n] float32 -> [m] float32
    """y = W x, where W is stored as bfloat16 bit patterns: y[o] = sum_i float(W[o, i]) · x[i], in float32.

    Read the uint16 weights directly (2 bytes each) and widen them inside the loop; do not widen the whole matrix
    first. Compile it with `@numba.njit(parallel=True, fastmath=True)` and split the output rows over threads with
    `numba.prange`. Numba cannot view a single scalar's bits, so widen a row into a small uint32 scratch buffer
    (`wide[i] = np.uint32(w[o, i]) << 16`) and read that buffer through `wide.view(np.float32)`. Allocate the buffer
    once per block of rows, not once per row. Sum in float32. The inputs must not be modified.

    Example: w = float32_to_bf16(np.array([[1, 2, 0, -1], [0.5, 0, 0, 0], [1, 1, 1, 1]], np.float32))
             gemv_bf16(w, np.array([1, 0.5, 2, 4], np.float32)) -> array([-2. ,  0.5,  7.5], dtype=float32)
    """
    raise NotImplementedError
