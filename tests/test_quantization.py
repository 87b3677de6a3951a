"""llama.cpp's block formats: blocks decoded by hand from the layout in ggml-quants.c, the quantizers' edge cases and
error bounds. Bit-for-bit agreement with llama.cpp's own files and its `gguf` package is checked in
tests/test_gguf_crosscheck.py."""

from __future__ import annotations

import numpy as np
import pytest

from tinyqwen.quantization import (
    BLOCK_BYTES,
    QuantizedTensor,
    dequantize_q4_k,
    dequantize_q6_k,
    dequantize_q8_0,
    quantize_q4_k,
    quantize_q6_k,
    quantize_q8_0,
)


def f16(value: float) -> list[int]:
    return list(np.float16(value).tobytes())


def test_q8_0_block_by_hand():
    # 0.5 everywhere: d = 0.5 / 127 rounded to float16 (0.003936767578125), every q = round(0.5 / (0.5/127)) = 127
    block = quantize_q8_0(np.full(32, 0.5, np.float32))
    assert block.shape == (34,)
    assert list(block[:2]) == f16(0.5 / 127) and np.float16(0.5 / 127) == np.float16(0.003936767578125)
    assert (block[2:].view(np.int8) == 127).all()
    # decoding: d * q in float32
    raw = np.array([*f16(0.25), 1, 2, 255, 128] + [0] * 28, np.uint8)
    assert dequantize_q8_0(raw)[:4].tolist() == [0.25, 0.5, -0.25, -32.0]


def test_q8_0_rounds_halves_away_from_zero():
    # C's roundf: x = [127, 63.5, -63.5, ...] gives d = 1, and 63.5 -> 64, -63.5 -> -64 (rint would give 64, -64 too;
    # 62.5 -> 63 tells them apart: rint gives 62)
    x = np.zeros(32, np.float32)
    x[:4] = [127, 62.5, -62.5, 0.5]
    q = quantize_q8_0(x)[2:].view(np.int8)
    assert q[:4].tolist() == [127, 63, -63, 1]


def q4_k_block(d, dmin, sc, m, low, high) -> np.ndarray:
    """A Q4_K block written from the layout: 6-bit sc/m packed into 12 bytes; qs groups of 32 bytes with sub-block
    2g in the low nibbles and 2g+1 in the high ones."""
    b = np.zeros(144, np.uint8)
    b[0:2], b[2:4] = f16(d), f16(dmin)
    for j in range(4):
        b[4 + j] = sc[j] | ((sc[j + 4] >> 4) << 6)
        b[8 + j] = m[j] | ((m[j + 4] >> 4) << 6)
        b[12 + j] = (sc[j + 4] & 15) | ((m[j + 4] & 15) << 4)
    for g in range(4):
        b[16 + 32 * g : 16 + 32 * (g + 1)] = low[g] | (high[g] << 4)
    return b


def test_q4_k_block_by_hand():
    sc = [1, 2, 3, 63, 4, 17, 45, 9]  # 63, 17 and 45 use the high bits
    m = [0, 5, 33, 1, 62, 2, 3, 16]
    low, high = [1, 3, 5, 15], [2, 0, 7, 9]
    got = dequantize_q4_k(q4_k_block(0.5, 0.25, sc, m, low, high))
    q = [low[0], high[0], low[1], high[1], low[2], high[2], low[3], high[3]]
    want = np.concatenate(
        [np.full(32, np.float32(0.5 * sc[j]) * q[j] - np.float32(0.25 * m[j])) for j in range(8)]
    )
    assert np.array_equal(got, want.astype(np.float32))


def test_q6_k_block_by_hand():
    # q for weight i: (i % 64) - 32; weight i of each half of 128 sits in ql/qh as ggml-quants.c lays it out
    L = np.arange(256) % 64  # q + 32
    b = np.zeros(210, np.uint8)
    for half in range(2):
        for l in range(32):
            q1, q2, q3, q4 = (L[128 * half + l + 32 * k] for k in range(4))
            b[64 * half + l] = (q1 & 15) | ((q3 & 15) << 4)
            b[64 * half + l + 32] = (q2 & 15) | ((q4 & 15) << 4)
            b[128 + 32 * half + l] = (q1 >> 4) | ((q2 >> 4) << 2) | ((q3 >> 4) << 4) | ((q4 >> 4) << 6)
    scales = np.arange(16, dtype=np.int8) - 8
    b[192:208] = scales.view(np.uint8)
    b[208:210] = f16(0.25)
    want = np.array(
        [np.float32(0.25 * scales[i // 16]) * np.float32(L[i] - 32) for i in range(256)], np.float32
    )
    assert np.array_equal(dequantize_q6_k(b), want)


@pytest.mark.parametrize("qtype", ["q8_0", "q4_k", "q6_k"])
def test_zeros_stay_zeros(qtype):
    blocks = QuantizedTensor.quantize(np.zeros((2, 256), np.float32), qtype)
    assert not blocks.dequantize().any()


def test_q6_k_zero_block_is_zero_bytes():
    assert not quantize_q6_k(np.zeros(256, np.float32)).any()


@pytest.mark.parametrize(
    "qtype,bound", [("q8_0", 0.006), ("q4_k", 0.08), ("q6_k", 0.02)]
)  # relative RMS error on Gaussian weights; measured 0.0054, 0.0717, 0.0178
def test_error_bounds_on_gaussian_weights(qtype, bound):
    x = np.random.default_rng(0).standard_normal((64, 1024)).astype(np.float32) * 0.02
    q = QuantizedTensor.quantize(x, qtype)
    assert q.data.shape == (64, 1024 // {"q8_0": 32}.get(qtype, 256) * BLOCK_BYTES[qtype])
    err = np.sqrt(np.mean((q.dequantize() - x) ** 2)) / x.std()
    assert err < bound


def test_q4_k_handles_all_positive_and_constant_blocks():
    x = np.concatenate([np.full(256, 0.3), np.linspace(0.1, 2.0, 256), -np.linspace(0.1, 2.0, 256)])
    x = x.astype(np.float32)
    y = dequantize_q4_k(quantize_q4_k(x))
    assert np.abs(y - x).max() < 2.0 / 15  # one 4-bit step of the widest sub-block
    assert np.allclose(y[:256], 0.3, atol=0.3 / 63)  # a constant sub-block: q = 15 with scale ~0.3/15, min 0


def test_quantized_tensor_checks_its_shape_and_slices_experts():
    stack = QuantizedTensor.quantize(np.ones((3, 4, 64), np.float32), "q8_0")
    assert stack[1].shape == (4, 64) and stack[1].data.shape == (4, 68)
    assert np.array_equal(stack[1:3].dequantize(), stack.dequantize()[1:3])
    assert np.allclose(stack.dequantize(), 1, atol=1e-4)  # d = 1/127 in float16: 0.99993896 after x127
    with pytest.raises(ValueError, match="whole number"):
        QuantizedTensor("q4_k", (2, 100), np.zeros((2, 72), np.uint8))
    with pytest.raises(ValueError, match="data must be uint8"):
        QuantizedTensor("q8_0", (2, 64), np.zeros((2, 67), np.uint8))
    with pytest.raises(ValueError, match="unknown quantization type"):
        QuantizedTensor("q5_k", (2, 256), np.zeros((2, 176), np.uint8))
