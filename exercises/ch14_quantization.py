"""Chapter 14 · Quantization: llama.cpp's Q8_0 and Q4_K blocks, an int8 GEMV, and KL divergence as the quality measure.

Work through notebooks/14-quantization.ipynb, then replace each `raise NotImplementedError` below, in order.
Grade with `pytest exercises/test_ch14_quantization.py`. The expected values are llama.cpp's own (its Python
package `gguf`), byte for byte. The last checkpoint dequantizes a real quantized Qwen3 with your functions and
compares its logits.

Block layouts (llama.cpp's ggml-quants.h), every multi-byte number little-endian:

    Q8_0, 32 weights in 34 bytes:   d float16 | qs int8 [32]                               w = d · q
    Q4_K, 256 weights in 144 bytes: d float16 | dmin float16 | scales [12] | qs [128]
                                    8 sub-blocks of 32 weights:  w = d · sc[j] · q − dmin · m[j]
                                    (sc[j], m[j]: 6-bit numbers packed into the 12 bytes; q: 4 bits, 0..15)

Useful NumPy: `a.view(np.int8)` reinterprets bytes without converting them; `np.float16(v).tobytes()` and
`raw.view("<f2")` write and read a little-endian float16; `a >> 4` and `a & 0x0F` split a byte into its nibbles.
"""

from __future__ import annotations

import numpy as np


def quantize_q8_0(x: np.ndarray) -> np.ndarray:  # float32 [..., n·32] -> uint8 [..., n·34]
    """Quantize each block of 32 consecutive values to Q8_0, exactly as llama.cpp does; return the blocks' bytes.

    Per block: d = max(|x|) / 127 (absmax: the largest magnitude, whatever its sign), computed in float32; then
    q = roundf(x · (1/d)) as int8, where roundf sends halves away from zero (2.5 → 3, −2.5 → −3; np.round would give
    2 and −2), and q = 0 when d = 0. Note that q uses the float32 d; only then is d rounded to float16 to be stored.
    Bytes of a block: d as a little-endian float16 (2 bytes), then the 32 q as int8 (viewed as uint8).
    The last axis must be a multiple of 32; the leading axes stay (a row of 256 values becomes 8 · 34 = 272 bytes).

    Example: x = [127, -63.5, 0.5, -1.5, 30.2, 0, ..., 0] / 64 (32 values): d = (127/64) / 127 = 1/64, float16 0x2400
             quantize_q8_0(x)[:7] -> [0x00, 0x24, 127, 192, 1, 254, 30]   (192 is −64 as a byte, 254 is −2)
    """
    raise NotImplementedError


def dequantize_q8_0(blocks: np.ndarray) -> np.ndarray:  # uint8 [..., n·34] -> float32 [..., n·32]
    """Turn Q8_0 blocks back into float32 values: w = d · q, block by block.

    Read d from the block's first two bytes as a little-endian float16 and widen it to float32; read the other 32
    bytes as *signed* int8 (byte 0xFF is −1). Multiply in float32. The leading axes stay.

    Example: dequantize_q8_0(quantize_q8_0(x)) for the x above -> [1.984375, -1.0, 0.015625, -0.03125, 0.46875, 0, …]
             (q · 1/64: the 0.5/64 and −1.5/64 became one step each, 30.2/64 became 30/64)
    """
    raise NotImplementedError


def unpack_q4_k_scales(
    packed: np.ndarray,
) -> tuple[np.ndarray, np.ndarray]:  # uint8 [..., 12] -> 2 x [..., 8]
    """Unpack Q4_K's 12-byte field into 8 six-bit scales and 8 six-bit mins (llama.cpp's get_scale_min_k4).

    16 six-bit numbers need 96 bits, exactly 12 bytes:
      - sub-blocks 0-3: scale j = low 6 bits of byte j; min j = low 6 bits of byte j + 4
      - sub-blocks 4-7: scale j = (low nibble of byte j + 4) | (top 2 bits of byte j − 4) << 4
                        min j   = (high nibble of byte j + 4) | (top 2 bits of byte j) << 4
    Return (scales, mins) as uint8 arrays [..., 8], values 0..63.

    Example: bytes 41 82 c3 3f 05 46 87 c8 21 43 65 87 (hex)
             -> scales [1, 2, 3, 63, 17, 35, 53, 7], mins [5, 6, 7, 8, 2, 20, 38, 56]
             (scale 4 = 0x1 | (0x41 >> 6) << 4 = 1 | 16 = 17; min 5 = 0x4 | (0x46 >> 6) << 4 = 4 | 16 = 20)
    """
    raise NotImplementedError


def dequantize_q4_k(blocks: np.ndarray) -> np.ndarray:  # uint8 [..., n·144] -> float32 [..., n·256]
    """Turn Q4_K super-blocks back into float32 values, exactly as llama.cpp does.

    A super-block: d (float16, bytes 0-1), dmin (float16, bytes 2-3), the 12-byte scale field (bytes 4-15: your
    unpack_q4_k_scales), then 128 bytes of 4-bit q. Those 128 bytes are 4 chunks of 32 bytes; chunk c holds two
    sub-blocks: the LOW nibbles of its 32 bytes are the 32 q of sub-block 2c, the HIGH nibbles those of sub-block
    2c + 1. Weight i of sub-block j is (d · sc[j]) · q − (dmin · m[j]): multiply d · sc[j] and dmin · m[j] first, in
    float32, as llama.cpp does. The min is subtracted: q runs 0..15, so the weights span −dmin·m .. d·sc·15 − dmin·m.

    Example: d = 0.5, dmin = 0.25, scale 0 = 2, min 0 = 4, every other scale and min 0, qs[0] = 0x71, the rest 0
             -> weight 0 = 0.5·2·1 − 0.25·4 = 0.0 (q = the low nibble, 1); weights 1-31 = 0.5·2·0 − 1 = −1.0;
                weights 32-255 = 0.0 (the high nibble 7 is weight 32, in sub-block 1, whose scale is 0)
    """
    raise NotImplementedError


def gemv_q8_0(
    w_blocks: np.ndarray, x: np.ndarray
) -> np.ndarray:  # uint8 [m, k·34], float32 [k·32] -> f32 [m]
    """y = W x the way llama.cpp's CPU backend does it for Q8_0 weights: in integers, one scale multiply per block.

    Quantize x to Q8_0 blocks too (your quantize_q8_0). Then for row o and block b: the integer dot product
    s = Σ_i qw[o, b, i] · qx[b, i] (widen to int32 first: int8 · int8 does not fit in int8, and NumPy keeps
    int8 arithmetic in int8), times d_w[o, b] · d_x[b]; y[o] sums those over the k blocks, in float32.
    Do not modify the inputs.

    Example: one row of one block, W = 1/64 · [127, 0, ..., 0] (d_w = 1/64), x = [2.0, 0, ..., 0] (d_x = 2/127)
             -> s = 127 · 127 = 16129, y ≈ 16129 · (1/64) · (2/127) ≈ [3.9688]  (d_x is stored as float16: not exact)
    """
    raise NotImplementedError


def kl_divergence(ref_logits: np.ndarray, logits: np.ndarray) -> np.ndarray:  # [..., V] x2 -> [...]
    """KL(P_ref ‖ P) per position: how much information the quantized model's distribution loses.

    P_ref = softmax(ref_logits), P = softmax(logits), both over the last axis (the vocabulary);
    KL = Σ_v P_ref[v] · (log P_ref[v] − log P[v]). Compute log-softmax stably (subtract the row's max before exp:
    logits of several hundred overflow exp), in float64. The reference is the first argument: KL is not symmetric.

    Example: kl_divergence(np.log([[0.5, 0.25, 0.25]]), np.log([[0.25, 0.5, 0.25]])) -> [0.1732868] (= 0.25 · ln 2)
    """
    raise NotImplementedError


def dequantize(qtype: str, data: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:  # -> float32 [*shape]
    """One tensor of a quantized checkpoint as float32 of `shape`, whatever its type.

    qtype "q8_0" or "q4_k": `data` is uint8 [rows, row bytes], the blocks of each row one after the other (use your
    dequantizers); "f32": `data` already holds the float32 values. Reshape the result to `shape`. An unknown qtype
    is an error that names it.

    Example: dequantize("q8_0", quantize_q8_0(w), w.shape) for w [4, 64] -> float32 [4, 64], within d/2 of w
    """
    raise NotImplementedError
