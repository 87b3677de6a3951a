"""Chapter 14 solutions, written out in plain NumPy (picoGPT style) rather than as calls into tinyqwen, so that the
byte layouts can be read here line by line. tinyqwen's own versions live in `tinyqwen/quantization.py`; the
checkpoints compare both with llama.cpp's definitions (the `gguf` package), never with each other.

Block layouts (llama.cpp's ggml-quants.h), every multi-byte number little-endian:

    Q8_0, 32 weights in 34 bytes:   d float16 | qs int8 [32]                  w = d · q
    Q4_K, 256 weights in 144 bytes: d float16 | dmin float16 | scales [12] | qs [128] (two 4-bit q per byte)
                                    8 sub-blocks of 32:  w = d · sc[j] · q − dmin · m[j]   (sc, m: 6 bits each)
"""

from __future__ import annotations

import numpy as np

QK8_0, QK_K = 32, 256  # weights per Q8_0 block, per Q4_K super-block
Q8_0_BYTES, Q4_K_BYTES = 34, 144


def _round_half_away(v: np.ndarray) -> np.ndarray:
    """C's roundf: halves go away from zero (2.5 -> 3, -2.5 -> -3); np.round would send them to even."""
    a = np.abs(v)
    whole = np.floor(a)
    # a - whole is exact in float32; floor(a + 0.5) is not (0.49999997 + 0.5 rounds up to 1.0)
    return np.sign(v) * (whole + (a - whole >= 0.5))


def quantize_q8_0(x: np.ndarray) -> np.ndarray:  # float32 [..., n·32] -> uint8 [..., n·34]
    x = np.asarray(x, np.float32)
    blocks = x.reshape(-1, QK8_0)  # [N, 32]
    amax = np.abs(blocks).max(axis=1)  # absmax, not max: -3 and 2 need a scale of 3/127
    d = amax / np.float32(127)  # float32, as llama.cpp computes it
    with np.errstate(divide="ignore"):
        inv = np.where(d > 0, np.float32(1) / d, np.float32(0)).astype(np.float32)
    q = _round_half_away(blocks * inv[:, None]).astype(np.int8)  # q from the float32 d, before d is rounded
    out = np.empty((len(blocks), Q8_0_BYTES), np.uint8)
    out[:, :2] = d.astype("<f2")[:, None].view(np.uint8)  # d stored as float16
    out[:, 2:] = q.view(np.uint8)
    return out.reshape(*x.shape[:-1], -1)


def dequantize_q8_0(blocks: np.ndarray) -> np.ndarray:  # uint8 [..., n·34] -> float32 [..., n·32]
    b = np.ascontiguousarray(blocks, np.uint8)
    flat = b.reshape(-1, Q8_0_BYTES)
    d = flat[:, :2].copy().view("<f2")[:, 0].astype(np.float32)  # [N]
    q = flat[:, 2:].view(np.int8).astype(np.float32)  # signed: byte 0xFF is -1
    return (d[:, None] * q).reshape(*b.shape[:-1], -1)


def unpack_q4_k_scales(
    packed: np.ndarray,
) -> tuple[np.ndarray, np.ndarray]:  # uint8 [..., 12] -> 2 x [..., 8]
    p = np.asarray(packed, np.uint8)
    sc = np.empty((*p.shape[:-1], 8), np.uint8)
    m = np.empty((*p.shape[:-1], 8), np.uint8)
    # sub-blocks 0-3: the low 6 bits of bytes 0-3 (scales) and 4-7 (mins)
    sc[..., :4] = p[..., 0:4] & 0x3F
    m[..., :4] = p[..., 4:8] & 0x3F
    # sub-blocks 4-7: low 4 bits from bytes 8-11 (scale low nibble, min high nibble), top 2 bits from the top 2 bits
    # of bytes 0-3 (scales) and 4-7 (mins)
    sc[..., 4:] = (p[..., 8:12] & 0x0F) | ((p[..., 0:4] >> 6) << 4)
    m[..., 4:] = (p[..., 8:12] >> 4) | ((p[..., 4:8] >> 6) << 4)
    return sc, m


def dequantize_q4_k(blocks: np.ndarray) -> np.ndarray:  # uint8 [..., n·144] -> float32 [..., n·256]
    b = np.ascontiguousarray(blocks, np.uint8)
    flat = b.reshape(-1, Q4_K_BYTES)  # [N, 144]
    d = flat[:, 0:2].copy().view("<f2")[:, 0].astype(np.float32)  # [N]
    dmin = flat[:, 2:4].copy().view("<f2")[:, 0].astype(np.float32)
    sc, m = unpack_q4_k_scales(flat[:, 4:16])  # [N, 8] each
    qs = flat[:, 16:].reshape(-1, 4, 32)  # 4 chunks of 32 bytes, each chunk holds two sub-blocks
    q = np.empty((len(flat), 8, 32), np.float32)
    q[:, 0::2] = qs & 0x0F  # sub-block 2c: the low nibbles of chunk c
    q[:, 1::2] = qs >> 4  # sub-block 2c + 1: the high nibbles of the same 32 bytes
    scale = (d[:, None] * sc.astype(np.float32))[:, :, None]  # [N, 8, 1], multiplied first, as llama.cpp does
    low = (dmin[:, None] * m.astype(np.float32))[:, :, None]
    return (scale * q - low).reshape(*b.shape[:-1], -1)


def gemv_q8_0(
    w_blocks: np.ndarray, x: np.ndarray
) -> np.ndarray:  # uint8 [m, k·34], float32 [k·32] -> f32 [m]
    w = np.ascontiguousarray(w_blocks, np.uint8)
    m = w.shape[0]
    wb = w.reshape(m, -1, Q8_0_BYTES)  # [m, k, 34]
    xb = quantize_q8_0(np.asarray(x, np.float32)).reshape(-1, Q8_0_BYTES)  # [k, 34]: x as int8 blocks too
    dw = wb[..., :2].copy().view("<f2")[..., 0].astype(np.float32)  # [m, k]
    dx = xb[:, :2].copy().view("<f2")[:, 0].astype(np.float32)  # [k]
    qw = wb[..., 2:].view(np.int8).astype(np.int32)  # widen before multiplying: int8 · int8 overflows int8
    qx = xb[:, 2:].view(np.int8).astype(np.int32)
    dots = np.einsum("mki,ki->mk", qw, qx)  # [m, k] integer sums, exact
    return (dots.astype(np.float32) * (dw * dx[None, :])).sum(axis=1, dtype=np.float32)  # one scale per block


def kl_divergence(ref_logits: np.ndarray, logits: np.ndarray) -> np.ndarray:  # [..., V] x2 -> [...]
    def log_softmax(z):
        z = np.asarray(z, np.float64)
        z = z - z.max(axis=-1, keepdims=True)
        return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))

    log_p, log_q = log_softmax(ref_logits), log_softmax(logits)
    return (np.exp(log_p) * (log_p - log_q)).sum(axis=-1)


def dequantize(qtype: str, data: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:  # -> float32 [shape]
    if qtype == "f32":
        return np.asarray(data).view(np.float32).reshape(shape)
    if qtype == "q8_0":
        return dequantize_q8_0(data).reshape(shape)
    if qtype == "q4_k":
        return dequantize_q4_k(data).reshape(shape)
    raise ValueError(f"unknown tensor type {qtype!r} (this chapter reads f32, q8_0 and q4_k)")
