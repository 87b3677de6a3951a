"""Planted mistakes for chapter 10: classic bf16 and GEMV bugs, injected into the solutions, fail with the intended
hint."""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from exercises import test_ch10_numba as grading
from exercises.solutions import ch10_numba as solution


def widen_values(u16):  # converts the integers, not the bits
    return np.asarray(u16).astype(np.float32)


def widen_by_8(u16):
    return (np.asarray(u16).astype(np.uint32) << 8).view(np.float32)


def truncate(x):  # keeps the top 16 bits: rounds toward zero
    return (np.asarray(x, np.float32).view(np.uint32) >> 16).astype(np.uint16)


def ties_away(x):  # rounds half away from zero instead of to even
    return ((np.asarray(x, np.float32).view(np.uint32).astype(np.uint64) + 0x8000) >> 16).astype(np.uint16)


def all_experts(config):  # the MoE layers read every expert
    wrong = dict(config, num_experts_per_tok=config.get("num_experts", 0))
    return solution.weights_per_token(wrong)


def no_head(config):
    return solution.weights_per_token(config) - config["vocab_size"] * config["hidden_size"]


@njit(parallel=True, fastmath=True)
def _transposed(w, x):  # sums down the columns: y[i] = Σ_o W[o, i] x[o]
    m, n = w.shape
    y = np.zeros(n, np.float32)
    for i in prange(n):
        acc = np.float32(0.0)
        for o in range(m):
            acc += (np.array([np.uint32(w[o, i]) << 16]).view(np.float32))[0] * x[o]
        y[i] = acc
    return y


def transposed(w, x):
    return _transposed(np.ascontiguousarray(w), np.ascontiguousarray(x, np.float32))


@njit(parallel=True, fastmath=True)
def _floor_blocks(w, x):  # m // 64 blocks: the last m % 64 rows are never written
    m, n = w.shape
    y = np.zeros(m, np.float32)
    for block in prange(m // 64):
        wide = np.empty(n, np.uint32)
        row = wide.view(np.float32)
        for o in range(block * 64, block * 64 + 64):
            for i in range(n):
                wide[i] = np.uint32(w[o, i]) << 16
            acc = np.float32(0.0)
            for i in range(n):
                acc += row[i] * x[i]
            y[o] = acc
    return y


def floor_blocks(w, x):
    return _floor_blocks(np.ascontiguousarray(w), np.ascontiguousarray(x, np.float32))


def integer_weights(w, x):  # the bit patterns' values used as weights
    return (np.asarray(w).astype(np.float32) @ np.asarray(x, np.float32)).astype(np.float32)


def test_widen_as_values(solutions, assert_caught):
    buggy = solutions.with_overrides("ch10", bf16_to_float32=widen_values)
    assert_caught(grading.test_widen_by_hand, buggy, hint="values, not bits")
    assert_caught(grading.test_widen_every_pattern, buggy, hint="values, not bits")


def test_widen_by_8(solutions, assert_caught):
    assert_caught(grading.test_widen_by_hand, solutions.with_overrides("ch10", bf16_to_float32=widen_by_8),
                  hint="shifted by 8 bits")  # fmt: skip


def test_truncation_instead_of_rounding(solutions, assert_caught):
    buggy = solutions.with_overrides("ch10", float32_to_bf16=truncate)
    assert_caught(grading.test_round_by_hand, buggy, hint="truncation")
    assert_caught(grading.test_round_like_torch, buggy, hint="truncation")


def test_ties_away_from_zero(solutions, assert_caught):
    assert_caught(grading.test_round_by_hand, solutions.with_overrides("ch10", float32_to_bf16=ties_away),
                  hint="ties were rounded away from zero")  # fmt: skip


def test_every_expert_counted(solutions, assert_caught):
    assert_caught(grading.test_weights_per_token_moe, solutions.with_overrides("ch10", weights_per_token=all_experts),
                  hint="every expert was counted")  # fmt: skip


def test_head_forgotten(solutions, assert_caught):
    assert_caught(grading.test_weights_per_token_dense, solutions.with_overrides("ch10", weights_per_token=no_head),
                  hint="output head was left out")  # fmt: skip


def test_gemv_transposed(solutions, assert_caught):
    assert_caught(grading.test_gemv_square, solutions.with_overrides("ch10", gemv_bf16=transposed),
                  hint="wrong axis")  # fmt: skip


def test_gemv_last_block_missing(solutions, assert_caught):
    # the fixture's matrices all have a multiple of 64 rows, so only the odd shape can see this one
    assert_caught(grading.test_gemv_odd_shape, solutions.with_overrides("ch10", gemv_bf16=floor_blocks),
                  hint="stops early")  # fmt: skip


def test_gemv_integer_weights(solutions, assert_caught):
    buggy = solutions.with_overrides("ch10", gemv_bf16=integer_weights)
    assert_caught(grading.test_gemv_by_hand, buggy, hint="used as integers")
    with np.errstate(
        over="ignore", invalid="ignore"
    ):  # weights of size ~16,000 overflow the norms: the point
        assert_caught(grading.test_real_model, buggy, hint="position 0 is already wrong")
