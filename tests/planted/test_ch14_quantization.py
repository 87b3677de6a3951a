"""Planted mistakes for chapter 14: classic quantization bugs (rounding mode, max instead of absmax, unsigned bytes,
nibble order, the 6-bit scale field, a forgotten dmin, int8 overflow, an unquantized activation, KL backwards),
injected into the solutions, must fail the grading with their hint — including inside the real quantized model."""

from __future__ import annotations

import numpy as np

import exercises.solutions.ch14_quantization as solution
import exercises.test_ch14_quantization as grading


def _q8_bytes(d: np.ndarray, q: np.ndarray, shape) -> np.ndarray:  # [N] float32, [N, 32] int8 -> bytes
    out = np.empty((len(d), 34), np.uint8)
    out[:, :2] = d.astype("<f2")[:, None].view(np.uint8)
    out[:, 2:] = q.view(np.uint8)
    return out.reshape(*shape[:-1], -1)


def quantize_ties_to_even(x):
    b = np.asarray(x, np.float32).reshape(-1, 32)
    d = np.abs(b).max(axis=1) / np.float32(127)
    with np.errstate(divide="ignore"):
        inv = np.where(d > 0, 1 / d, 0).astype(np.float32)
    return _q8_bytes(d, np.round(b * inv[:, None]).astype(np.int8), np.shape(x))


def quantize_signed_max(x):
    b = np.asarray(x, np.float32).reshape(-1, 32)
    d = b.max(axis=1) / np.float32(127)
    with np.errstate(divide="ignore"):
        inv = np.where(d != 0, 1 / d, 0).astype(np.float32)
    q = np.clip(solution._round_half_away(b * inv[:, None]), -128, 127).astype(np.int8)
    return _q8_bytes(d, q, np.shape(x))


def dequantize_q8_0_unsigned(blocks):
    b = np.asarray(blocks).reshape(-1, 34)
    d = b[:, :2].copy().view("<f2")[:, 0].astype(np.float32)
    return (d[:, None] * b[:, 2:].astype(np.float32)).reshape(*np.shape(blocks)[:-1], -1)


def unpack_scales_ignoring_top_bits(p):
    return grading._q4k_unpack_wrong(np.asarray(p), "low_only")


def dequantize_q4_k_high_first(blocks):
    return grading._q4k_deq_variant(np.asarray(blocks), "high_first")


def dequantize_q4_k_without_min(blocks):
    return grading._q4k_deq_variant(np.asarray(blocks), "no_min")


def gemv_in_int8(w, x):
    wb = w.reshape(len(w), -1, 34)
    xb = solution.quantize_q8_0(x).reshape(-1, 34)
    dw = wb[..., :2].copy().view("<f2")[..., 0].astype(np.float32)
    dx = xb[:, :2].copy().view("<f2")[:, 0].astype(np.float32)
    dots = (wb[..., 2:].view(np.int8) * xb[:, 2:].view(np.int8)[None]).sum(-1, dtype=np.int8)  # wraps around
    return (dots.astype(np.float32) * dw * dx).sum(axis=1)


def gemv_float_activation(w, x):
    return solution.dequantize_q8_0(w) @ x


def kl_backwards(ref_logits, logits):
    return solution.kl_divergence(logits, ref_logits)


def test_ties_to_even(solutions, assert_caught):
    buggy = solutions.with_overrides("ch14", quantize_q8_0=quantize_ties_to_even)
    assert_caught(grading.test_q8_0_by_hand, buggy, hint="rounded to even")
    assert_caught(grading.test_q8_0_like_llamacpp, buggy, hint="rounded to even")


def test_max_instead_of_absmax(solutions, assert_caught):
    buggy = solutions.with_overrides("ch14", quantize_q8_0=quantize_signed_max)
    assert_caught(grading.test_q8_0_like_llamacpp, buggy, hint="max(|x|)")


def test_unsigned_bytes(solutions, assert_caught):
    buggy = solutions.with_overrides("ch14", dequantize_q8_0=dequantize_q8_0_unsigned)
    assert_caught(grading.test_q8_0_dequantize, buggy, hint="unsigned")


def test_scale_field_top_bits_ignored(solutions, assert_caught):
    buggy = solutions.with_overrides("ch14", unpack_q4_k_scales=unpack_scales_ignoring_top_bits)
    assert_caught(grading.test_q4_k_scales_by_hand, buggy, hint="top two bits")
    assert_caught(grading.test_q4_k_scales_like_llamacpp, buggy, hint="top two bits")


def test_nibble_order(solutions, assert_caught):
    buggy = solutions.with_overrides("ch14", dequantize_q4_k=dequantize_q4_k_high_first)
    assert_caught(grading.test_q4_k_block_by_hand, buggy, hint="high nibble was taken first")
    assert_caught(grading.test_q4_k_like_llamacpp, buggy, hint="high nibble was taken first")


def dequantize_with_high_nibbles_first(qtype, data, shape):
    if qtype == "q4_k":
        return dequantize_q4_k_high_first(data).reshape(shape)
    return solution.dequantize(qtype, data, shape)


def test_nibble_order_in_the_real_model(solutions, assert_caught):
    buggy = solutions.with_overrides("ch14", dequantize=dequantize_with_high_nibbles_first)
    assert_caught(grading.test_real_model, buggy, hint="a q4_k tensor is decoded wrong")


def test_forgotten_dmin(solutions, assert_caught):
    buggy = solutions.with_overrides("ch14", dequantize_q4_k=dequantize_q4_k_without_min)
    assert_caught(grading.test_q4_k_like_llamacpp, buggy, hint="min was forgotten")


def test_int8_overflow(solutions, assert_caught):
    buggy = solutions.with_overrides("ch14", gemv_q8_0=gemv_in_int8)
    assert_caught(grading.test_gemv_wide, buggy, hint="summed in int8")


def test_activation_not_quantized(solutions, assert_caught):
    buggy = solutions.with_overrides("ch14", gemv_q8_0=gemv_float_activation)
    assert_caught(grading.test_gemv_wide, buggy, hint="x was not quantized")


def test_kl_backwards(solutions, assert_caught):
    buggy = solutions.with_overrides("ch14", kl_divergence=kl_backwards)
    assert_caught(grading.test_kl_direction_and_large_logits, buggy, hint="arguments were swapped")
