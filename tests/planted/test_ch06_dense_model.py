"""Planted mistakes for chapter 6: classic learner bugs, injected into the solutions, must fail with their hint."""

from __future__ import annotations

import doctest
from pathlib import Path

import numpy as np
import pytest

import exercises.ch06_dense_model as stubs
import exercises.solutions.ch06_dense_model as solution
import exercises.test_ch06_dense_model as grading
from tinyqwen import mlp
from tinyqwen.attention import attention
from tinyqwen.norm import rms_norm
from tinyqwen.rope import apply_rope

# the real-model checkpoint runs the solutions of chapters 3-5 too: they arrive with those chapters' branches
REPO = Path(__file__).resolve().parents[2]
NEEDS_CHAPTERS_3_TO_5 = pytest.mark.skipif(
    not all(any((REPO / "exercises" / "solutions").glob(f"ch{n:02d}_*.py")) for n in (3, 4, 5)),
    reason="exercises/solutions/ch03-ch05 are not in this checkout yet",
)


def sigmoid_not_silu(z):
    with np.errstate(over="ignore"):
        return 1 / (1 + np.exp(-z))


def linear_no_transpose(x, w):
    return x @ w  # the [out, in] layout ignored


def swiglu_silu_on_up(x, w_gate, w_up, w_down):
    return mlp.linear(mlp.linear(x, w_gate) * mlp.silu(mlp.linear(x, w_up)), w_down)


def _attention(
    h, w, cos, sin, mask, head_dim, eps
):  # the attention sublayer alone: no norm before, no residual
    B, T, _ = h.shape
    q = rms_norm(
        mlp.linear(h, w["self_attn.q_proj.weight"]).reshape(B, T, -1, head_dim),
        w["self_attn.q_norm.weight"],
        eps,
    )
    k = rms_norm(
        mlp.linear(h, w["self_attn.k_proj.weight"]).reshape(B, T, -1, head_dim),
        w["self_attn.k_norm.weight"],
        eps,
    )
    v = mlp.linear(h, w["self_attn.v_proj.weight"]).reshape(B, T, -1, head_dim).transpose(0, 2, 1, 3)
    q, k = (apply_rope(a.transpose(0, 2, 1, 3), cos, sin) for a in (q, k))
    out = attention(q, k, v, mask).transpose(0, 2, 1, 3).reshape(B, T, -1)
    return mlp.linear(out, w["self_attn.o_proj.weight"])


def _mlp(h, w):
    return mlp.swiglu(h, *(w[f"mlp.{n}_proj.weight"] for n in ("gate", "up", "down")))


def decoder_post_norm(x, w, cos, sin, mask, head_dim, eps):
    h = rms_norm(x + _attention(x, w, cos, sin, mask, head_dim, eps), w["input_layernorm.weight"], eps)
    return rms_norm(h + _mlp(h, w), w["post_attention_layernorm.weight"], eps)


def decoder_no_mlp_residual(x, w, cos, sin, mask, head_dim, eps):
    h = x + _attention(rms_norm(x, w["input_layernorm.weight"], eps), w, cos, sin, mask, head_dim, eps)
    return _mlp(rms_norm(h, w["post_attention_layernorm.weight"], eps), w)


def decoder_in_place(x, w, cos, sin, mask, head_dim, eps):
    x += _attention(rms_norm(x, w["input_layernorm.weight"], eps), w, cos, sin, mask, head_dim, eps)
    return x + _mlp(rms_norm(x, w["post_attention_layernorm.weight"], eps), w)


def lm_head_copy(weights, tie_word_embeddings):
    if tie_word_embeddings:
        return weights["model.embed_tokens.weight"].copy()  # same values, a second array
    return weights["lm_head.weight"]


def lm_head_always_embed(weights, tie_word_embeddings):
    return weights["model.embed_tokens.weight"]


def count_tied_twice(config):
    extra = config.vocab_size * config.hidden_size if config.tie_word_embeddings else 0
    return solution.count_parameters(config) + extra


def count_without_qk_norm(config):
    return solution.count_parameters(config) - 2 * config.head_dim * config.num_hidden_layers


def forward_no_final_norm(ids, weights, config):
    B, T = np.asarray(ids).shape
    cos, sin = solution.rope_tables(config, np.broadcast_to(np.arange(T), (B, T)))
    mask = np.broadcast_to(np.tril(np.ones((T, T), dtype=bool)), (B, T, T))
    x = weights["model.embed_tokens.weight"][ids]
    for i in range(config.num_hidden_layers):
        layer = {
            k.removeprefix(f"model.layers.{i}."): v
            for k, v in weights.items()
            if k.startswith(f"model.layers.{i}.")
        }
        x = solution.decoder_layer(x, layer, cos, sin, mask, config.head_dim, config.rms_norm_eps)
    return mlp.linear(x, solution.lm_head_weight(weights, config.tie_word_embeddings))  # model.norm skipped


def test_sigmoid_instead_of_silu(solutions, assert_caught):
    assert_caught(grading.test_silu, solutions.with_overrides("ch06", silu=sigmoid_not_silu), hint="sigmoid")


def test_weight_not_transposed(solutions, assert_caught):
    assert_caught(
        grading.test_linear, solutions.with_overrides("ch06", linear=linear_no_transpose), hint="x @ w.T"
    )


def test_silu_on_up(solutions, assert_caught):
    course = solutions.with_overrides("ch06", swiglu=swiglu_silu_on_up)
    assert_caught(grading.test_swiglu_one_token, course, hint="up projection instead of the gate")
    assert_caught(grading.test_swiglu_batch, course, hint="up projection instead of the gate")


def test_post_norm(solutions, assert_caught):
    course = solutions.with_overrides("ch06", decoder_layer=decoder_post_norm)
    assert_caught(grading.test_decoder_layer, course, hint="pre-norm")


def test_forgotten_residual(solutions, assert_caught):
    course = solutions.with_overrides("ch06", decoder_layer=decoder_no_mlp_residual)
    assert_caught(grading.test_decoder_layer, course, hint="MLP residual is missing")
    assert_caught(grading.test_fixture_layer, course, hint="values are off")


def test_input_modified_in_place(solutions, assert_caught):
    course = solutions.with_overrides("ch06", decoder_layer=decoder_in_place)
    assert_caught(grading.test_decoder_layer, course, hint="changed its input x in place")


def test_head_copied_not_tied(solutions, assert_caught):
    course = solutions.with_overrides("ch06", lm_head_weight=lm_head_copy)
    assert_caught(grading.test_tied_head, course, hint="copy of the embedding")


def test_head_tied_when_untied(solutions, assert_caught):
    course = solutions.with_overrides("ch06", lm_head_weight=lm_head_always_embed)
    assert_caught(grading.test_tied_head, course, hint="own 'lm_head.weight'")


def test_count_tied_twice(solutions, assert_caught):
    course = solutions.with_overrides("ch06", count_parameters=count_tied_twice)
    assert_caught(grading.test_count_parameters, course, hint="counted a second time")


def test_count_without_qk_norm(solutions, assert_caught):
    course = solutions.with_overrides("ch06", count_parameters=count_without_qk_norm)
    assert_caught(grading.test_count_parameters, course, hint="q_norm and k_norm")


def test_no_final_norm(solutions, assert_caught):
    course = solutions.with_overrides("ch06", forward=forward_no_final_norm)
    assert_caught(grading.test_forward_tied, course, hint="final RMSNorm")
    assert_caught(grading.test_forward_untied, course, hint="final RMSNorm")


@NEEDS_CHAPTERS_3_TO_5
def test_buggy_swiglu_breaks_the_real_model(solutions, assert_caught):
    """The last checkpoint sees a kernel bug too, and points at the per-token pieces."""
    course = solutions.with_overrides("ch06", swiglu=swiglu_silu_on_up)
    assert_caught(grading.test_real_model, course, hint="per-token pieces")


@pytest.mark.parametrize("name", ["silu", "linear", "swiglu"])
def test_stub_examples_hold(name):
    """The worked examples in the stubs' docstrings are right (run against the solutions)."""
    test = doctest.DocTestParser().get_doctest(
        getattr(stubs, name).__doc__, {"np": np, name: getattr(solution, name)}, name, None, 0
    )
    runner = doctest.DocTestRunner()
    runner.run(test)
    assert runner.summarize(verbose=False).failed == 0


def decoder_without_qk_norm(x, w, cos, sin, mask, head_dim, eps):  # a Llama / Qwen2 layer
    B, T, _ = x.shape
    h = rms_norm(x, w["input_layernorm.weight"], eps)
    q, k, v = (
        mlp.linear(h, w[f"self_attn.{n}_proj.weight"]).reshape(B, T, -1, head_dim).transpose(0, 2, 1, 3)
        for n in "qkv"
    )
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    out = attention(q, k, v, mask).transpose(0, 2, 1, 3).reshape(B, T, -1)
    h = x + mlp.linear(out, w["self_attn.o_proj.weight"])
    return h + _mlp(rms_norm(h, w["post_attention_layernorm.weight"], eps), w)


def test_the_hand_written_layer_is_right():
    """The layer the QK-Norm mistake is derived from equals transformers' when nothing is left out."""
    got = grading.layer_by_hand(*grading._decoder_inputs(), 16, 1e-6)
    np.testing.assert_allclose(got, grading.REF["decoder.out"], atol=1e-4)


def test_missing_qk_norm(solutions, assert_caught):
    buggy = solutions.with_overrides("ch06", decoder_layer=decoder_without_qk_norm)
    assert_caught(grading.test_decoder_layer, buggy, hint="QK-Norm is missing")
