"""bfloat16 in NumPy, which has no bfloat16: the bit patterns as uint16, and the two conversions.

bfloat16 ("brain float") is the top half of a float32: 1 sign bit, the same 8 exponent bits, and the first 7 of
float32's 23 mantissa bits. Most Qwen3 checkpoints store their weights in it, and a bf16 KV cache keeps keys and
values in it. So widening to float32 is exact (a shift), and narrowing is a rounding (nearest, ties to even):

    float32 1.0            0x3F80_0000      sign 0, exponent 127, mantissa 0
    bfloat16 1.0           0x3F80           its top 16 bits
    float32 1 + 2⁻⁸        0x3F80_8000      exactly halfway between bf16 0x3F80 and 0x3F81: rounds to even, 0x3F80

>>> float32_to_bf16(np.array([1.0, 3.0], np.float32)), bf16_to_float32(np.array([0x4040], np.uint16))
(array([16256, 16448], dtype=uint16), array([3.], dtype=float32))

The file formats (`tinyqwen.safetensors`), the KV cache, the reference attention and the backends all use these
two functions; this module imports nothing of tinyqwen's, so each of them may.
"""

from __future__ import annotations

import numpy as np


def bf16_to_float32(u16: np.ndarray) -> np.ndarray:  # [...] uint16 bit patterns -> [...] float32
    """Widen bfloat16 bit patterns to float32, exactly.

    bfloat16 *is* the top half of a float32: 1 sign bit, the same 8 exponent bits, and the first 7 of float32's 23
    mantissa bits. So widening is a shift: put the 16 bits in the high half of a uint32, zeros in the low half, and
    reinterpret those 32 bits as a float32. No rounding happens; every bf16 value is a float32 value.

    >>> bf16_to_float32(np.array([0x3F80, 0xC000, 0x3FC0, 0x7F80], dtype=np.uint16))
    array([ 1. , -2. ,  1.5,  inf], dtype=float32)

    (0x3F80 -> 0x3F800000 = 1.0; 0xC000 -> 0xC0000000 = -2.0; 0x3FC0 -> 0x3FC00000 = 1.5; 0x7F80 -> +inf.)
    """
    u16 = np.asarray(u16)
    if u16.dtype != np.uint16:
        raise TypeError(f"bf16_to_float32 expects uint16 bit patterns, got {u16.dtype}")
    u32 = u16.astype(np.uint32)  # the one allocation: 4 bytes per element
    u32 <<= 16  # in place: no second temporary for a 1 GB tensor
    return u32.view(np.float32)


def float32_to_bf16(x: np.ndarray) -> np.ndarray:  # [...] float -> [...] uint16 bit patterns
    """Round float32 values to bfloat16 bit patterns: round to nearest, ties to even (as torch does).

    Dropping the low 16 bits would truncate (round toward zero). To round to nearest we add 0x7FFF before the
    shift, which carries into bit 16 exactly when the low half is above 0x8000. At exactly 0x8000 (a tie) we add
    one more if bit 16 is already 1, so ties go to the even neighbour. Overflow rounds to inf, as it should.
    NaN would be at risk (its mantissa could carry into the exponent and become inf), so NaN maps to the
    canonical quiet NaN 0x7FC0 (0xFFC0 if negative). float64 input is first rounded to float32, as torch does.

    >>> [hex(v) for v in float32_to_bf16(np.array([1.0, -2.0, 1 + 2**-8, 1 + 3 * 2**-8, np.inf], np.float32))]
    ['0x3f80', '0xc000', '0x3f80', '0x3f82', '0x7f80']

    (1 + 2**-8 is 0x3F808000, halfway between 0x3F80 and 0x3F81: the tie goes to the even 0x3F80. 1 + 3*2**-8 is
    0x3F818000, halfway between 0x3F81 and 0x3F82: it goes to the even 0x3F82.)
    """
    x = np.asarray(x, dtype=np.float32)
    # 1-d, because uint32 overflow on a 0-d array warns; only NaNs can overflow here, and they are replaced below
    flat = x.reshape(-1)
    bits = flat.view(np.uint32)
    rounded = bits >> 16  # in place from here on: one uint32 temporary, not four
    rounded &= 1  # the lowest bit that survives: 1 if the truncated result would be odd
    rounded += np.uint32(0x7FFF)
    rounded += bits
    rounded >>= 16
    out = rounded.astype(np.uint16)
    nan = np.isnan(flat)
    if nan.any():
        out[nan] = np.where(np.signbit(flat[nan]), 0xFFC0, 0x7FC0)
    return out.reshape(x.shape)
