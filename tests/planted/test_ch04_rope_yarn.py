"""Planted mistakes for chapter 4: classic RoPE/YaRN bugs, injected into the solutions, fail with the right hint."""

from __future__ import annotations

import doctest
import math

import numpy as np
import pytest

import exercises.ch04_rope_yarn as stubs
import exercises.solutions.ch04_rope_yarn as solutions_ch04
import exercises.test_ch04_rope_yarn as grading


def interleaved_rope(x, cos, sin):  # the GPT-J layout: neighbours (2i, 2i+1) share angle i
    half = x.shape[-1] // 2
    c, s = cos[:, None, :, :half], sin[:, None, :, :half]
    out = np.empty_like(x)
    out[..., 0::2] = x[..., 0::2] * c - x[..., 1::2] * s
    out[..., 1::2] = x[..., 0::2] * s + x[..., 1::2] * c
    return out


def backwards_rope(x, cos, sin):  # rotate_half with the minus on the wrong half
    half = x.shape[-1] // 2
    return x * cos[:, None] + np.concatenate([x[..., half:], -x[..., :half]], axis=-1) * sin[:, None]


def sign_flipped_rotate_half(x):
    half = x.shape[-1] // 2
    return np.concatenate([x[..., half:], -x[..., :half]], axis=-1)


def cos_sin_from_one(positions, inv_freq, attention_factor=1.0):
    return solutions_ch04.rope_cos_sin(np.asarray(positions) + 1, inv_freq, attention_factor)


def cos_sin_float64(positions, inv_freq, attention_factor=1.0):
    # the NumPy trap: int64 positions times a float32 array is computed in float64
    angles = np.asarray(positions)[..., None] * np.asarray(inv_freq, dtype=np.float32)
    angles = np.concatenate([angles, angles], axis=-1)
    return (np.cos(angles) * attention_factor).astype(np.float32), (np.sin(angles) * attention_factor).astype(
        np.float32
    )


def cos_sin_no_factor(positions, inv_freq, attention_factor=1.0):
    return solutions_ch04.rope_cos_sin(positions, inv_freq, 1.0)


def yarn_ramp_reversed(
    head_dim, theta, factor, original_max_position_embeddings, beta_fast=32.0, beta_slow=1.0
):
    def dim(rotations):
        return (
            head_dim
            * math.log(original_max_position_embeddings / (rotations * 2 * math.pi))
            / (2 * math.log(theta))
        )

    low, high = max(math.floor(dim(beta_fast)), 0), min(math.ceil(dim(beta_slow)), head_dim - 1)
    ramp = np.clip((np.arange(head_dim // 2, dtype=np.float32) - low) / (high - low), 0, 1)
    inv = solutions_ch04.rope_inv_freq(head_dim, theta)
    return (inv * ramp + inv / np.float32(factor) * (1 - ramp)).astype(np.float32)  # keeps the slow pairs


def attention_factor_log10(factor):
    return 0.1 * math.log10(factor) + 1 if factor > 1 else 1.0


def test_interleaved_rope_is_caught(solutions, assert_caught):
    buggy = solutions.with_overrides("ch04", apply_rope=interleaved_rope)
    assert_caught(grading.test_apply_rope, buggy, hint="split-half")


def test_interleaved_rope_breaks_the_real_model(solutions, assert_caught):
    buggy = solutions.with_overrides("ch04", apply_rope=interleaved_rope)
    # position 0 is not rotated at all, so the model is right there and wrong later: the grader says "RoPE"
    assert_caught(grading.test_real_model, buggy, hint="position 0 is right but later positions are not")


def test_backwards_rotation_is_caught(solutions, assert_caught):
    buggy = solutions.with_overrides("ch04", apply_rope=backwards_rope)
    assert_caught(grading.test_apply_rope, buggy, hint="rotation runs backwards")


def test_rotate_half_sign_flipped_is_caught(solutions, assert_caught):
    buggy = solutions.with_overrides("ch04", rotate_half=sign_flipped_rotate_half)
    assert_caught(grading.test_rotate_half, buggy, hint="the sign is on the wrong half")


def test_positions_from_one_are_caught(solutions, assert_caught):
    buggy = solutions.with_overrides("ch04", rope_cos_sin=cos_sin_from_one)
    assert_caught(grading.test_cos_sin_short, buggy, hint="positions counted from 1")


def test_float64_angles_are_caught_at_long_positions(solutions, assert_caught):
    buggy = solutions.with_overrides("ch04", rope_cos_sin=cos_sin_float64)
    grading.test_cos_sin_short(buggy)  # at positions < 10 float64 angles agree with float32 ones
    assert_caught(grading.test_cos_sin_long, buggy, hint="computed in float64")


def test_missing_attention_factor_is_caught(solutions, assert_caught):
    buggy = solutions.with_overrides("ch04", rope_cos_sin=cos_sin_no_factor)
    assert_caught(grading.test_cos_sin_long, buggy, hint="attention factor was not applied")


def test_reversed_ramp_is_caught(solutions, assert_caught):
    buggy = solutions.with_overrides("ch04", yarn_inv_freq=yarn_ramp_reversed)
    assert_caught(grading.test_yarn_inv_freq, buggy, hint="the ramp runs the wrong way")
    assert_caught(grading.test_real_model, buggy, hint="later positions")


def test_log10_attention_factor_is_caught(solutions, assert_caught):
    buggy = solutions.with_overrides("ch04", yarn_attention_factor=attention_factor_log10)
    assert_caught(grading.test_yarn_attention_factor, buggy, hint="natural log")
    assert_caught(grading.test_real_model, buggy, hint="logits")


@pytest.mark.parametrize(
    "name", [n for n in dir(stubs) if callable(getattr(stubs, n)) and not n.startswith("_")]
)
def test_stub_docstring_examples_hold_for_the_solutions(name):
    """The worked example in each stub's docstring is right: it passes with the solution in place of the stub."""
    if getattr(stubs, name).__module__ != stubs.__name__:
        pytest.skip(f"{name} is imported, not an exercise")
    globs = {
        "np": np,
        **{k: getattr(solutions_ch04, k) for k in dir(solutions_ch04) if not k.startswith("_")},
    }
    tests = doctest.DocTestFinder().find(getattr(stubs, name), name, globs=globs)
    assert tests and tests[0].examples, f"{name}: its docstring has no worked example"
    runner = doctest.DocTestRunner(optionflags=doctest.NORMALIZE_WHITESPACE)
    for test in tests:
        runner.run(test)
    assert runner.failures == 0


def inv_freq_llama2_theta(head_dim, theta):  # theta hard-coded to Llama 2's 10000
    return (1.0 / 10000.0 ** (np.arange(0, head_dim, 2) / head_dim)).astype(np.float32)


def test_hard_coded_theta_is_caught(solutions, assert_caught):
    buggy = solutions.with_overrides("ch04", rope_inv_freq=inv_freq_llama2_theta)
    assert_caught(grading.test_inv_freq, buggy, hint="theta argument was ignored")


def rope_without_heads_axis(x, cos, sin):  # fine on [T, d], crashes on the model's [B, heads, T, d]
    half = x.shape[-1] // 2
    return x * cos + np.concatenate([-x[..., half:], x[..., :half]], axis=-1) * sin


def test_a_crash_inside_the_model_names_the_function(solutions, assert_caught):
    buggy = solutions.with_overrides("ch04", apply_rope=rope_without_heads_axis)
    message = assert_caught(
        grading.test_real_model, buggy, hint="your apply_rope() (exercises, chapter 4) raised"
    )
    assert "part of the model" in message
