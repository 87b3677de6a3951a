"""Planted mistakes for chapter 3: classic embedding and RMSNorm bugs, injected into the solutions, fail with the
intended hint."""

from __future__ import annotations

import numpy as np

from exercises import test_ch03_embeddings_rmsnorm as grading


def layer_norm(x, weight, eps):  # mean subtraction: LayerNorm without the bias
    x = x.astype(np.float32)
    centred = x - x.mean(axis=-1, keepdims=True)
    return centred / np.sqrt(np.mean(centred**2, axis=-1, keepdims=True) + eps) * weight


def eps_outside(x, weight, eps):
    x = x.astype(np.float32)
    return x / (np.sqrt(np.mean(x * x, axis=-1, keepdims=True)) + eps) * weight


def whole_array(x, weight, eps):  # no axis: one RMS for the whole batch
    x = x.astype(np.float32)
    return x / np.sqrt(np.mean(x * x) + eps) * weight


def no_weight(x, weight, eps):
    x = x.astype(np.float32)
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps)


def no_sqrt(x, weight, eps):
    x = x.astype(np.float32)
    return x / (np.mean(x * x, axis=-1, keepdims=True) + eps) * weight


def in_float16(x, weight, eps):  # keeps the input's float16 for the squares
    with np.errstate(over="ignore", invalid="ignore"):
        h = np.asarray(x).astype(np.float16)
        out = (
            h / np.sqrt(np.mean(h * h, axis=-1, keepdims=True) + np.float16(eps)) * weight.astype(np.float16)
        )
    return out.astype(np.float32)


def all_heads_together(x, weight, eps):  # QK-Norm over heads × head_dim instead of per head
    x = x.astype(np.float32)
    axes = (-2, -1) if x.ndim == 4 else -1
    return x / np.sqrt(np.mean(x * x, axis=axes, keepdims=True) + eps) * weight


def no_range_check(ids, table):
    return table[np.asarray(ids)]


def test_layer_norm(solutions, assert_caught):
    buggy = solutions.with_overrides("ch03", rms_norm=layer_norm)
    assert_caught(grading.test_rms_norm_batch, buggy, hint="the mean was subtracted")
    assert_caught(grading.test_real_model, buggy, hint="RMSNorm")  # and the real model points at the norms


def test_eps_outside_sqrt(solutions, assert_caught):
    assert_caught(grading.test_rms_norm_tiny, solutions.with_overrides("ch03", rms_norm=eps_outside),
                  hint="eps was added outside the square root")  # fmt: skip


def test_wrong_axis(solutions, assert_caught):
    assert_caught(grading.test_rms_norm_batch, solutions.with_overrides("ch03", rms_norm=whole_array),
                  hint="over the whole array")  # fmt: skip


def test_weight_forgotten(solutions, assert_caught):
    assert_caught(grading.test_rms_norm_vector, solutions.with_overrides("ch03", rms_norm=no_weight),
                  hint="the weight was left out")  # fmt: skip


def test_sqrt_missing(solutions, assert_caught):
    assert_caught(grading.test_rms_norm_vector, solutions.with_overrides("ch03", rms_norm=no_sqrt),
                  hint="the square root is missing")  # fmt: skip


def test_computed_in_float16(solutions, assert_caught):
    assert_caught(grading.test_rms_norm_float16_input, solutions.with_overrides("ch03", rms_norm=in_float16),
                  hint="computed in float16")  # fmt: skip


def test_qk_norm_over_all_heads(solutions, assert_caught):
    assert_caught(grading.test_rms_norm_heads, solutions.with_overrides("ch03", rms_norm=all_heads_together),
                  hint="all heads of a token were normalised together")  # fmt: skip


def test_negative_ids_wrap(solutions, assert_caught):
    assert_caught(grading.test_embed_refuses_bad_ids, solutions.with_overrides("ch03", embed=no_range_check),
                  hint="table[-1]")  # fmt: skip


def gemma_weight(x, weight, eps):  # Gemma's RMSNorm multiplies by (1 + weight)
    x = x.astype(np.float32)
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * (1 + weight)


def sum_not_mean(x, weight, eps):
    x = x.astype(np.float32)
    return x / np.sqrt(np.sum(x * x, axis=-1, keepdims=True) + eps) * weight


def gemma_embedding_scale(ids, table):  # Gemma scales the embeddings by sqrt(hidden)
    ids = np.asarray(ids)
    if ids.min() < 0 or ids.max() >= table.shape[0]:
        raise IndexError("id out of range")
    return table[ids] * np.float32(table.shape[1] ** 0.5)


def test_gemma_weight(solutions, assert_caught):
    buggy = solutions.with_overrides("ch03", rms_norm=gemma_weight)
    assert_caught(grading.test_rms_norm_vector, buggy, hint="(1 + weight), Gemma's convention")
    assert_caught(grading.test_real_model, buggy, hint="RMSNorm")


def test_sum_not_mean(solutions, assert_caught):
    assert_caught(grading.test_rms_norm_batch, solutions.with_overrides("ch03", rms_norm=sum_not_mean),
                  hint="summed, not averaged")  # fmt: skip


def test_gemma_embedding_scale(solutions, assert_caught):
    buggy = solutions.with_overrides("ch03", embed=gemma_embedding_scale)
    assert_caught(grading.test_embed_sequence, buggy, hint="Gemma's embedding scale")
    assert_caught(grading.test_embed_real_table, buggy, hint="Gemma's embedding scale")
    # the learner's embed now runs inside the model: the whole model's logits are wrong too
    assert_caught(grading.test_real_model, buggy, hint="position 0 is already wrong")
