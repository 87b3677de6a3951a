"""Planted mistakes for chapter 5: classic attention bugs, injected into the solutions, fail with the right hint."""

from __future__ import annotations

import doctest

import numpy as np
import pytest

import exercises.ch05_attention as stubs
import exercises.solutions.ch05_attention as solutions_ch05
import exercises.test_ch05_attention as grading

MIN = np.finfo(np.float32).min


def softmax_last_axis_only(x, axis=-1):  # ignores `axis`
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def softmax_without_max(x, axis=-1):
    e = np.exp(x)
    return e / e.sum(axis=axis, keepdims=True)


def mask_without_diagonal(n_q, n_k):
    return np.tril(np.ones((n_q, n_k), dtype=bool), k=n_k - n_q - 1)


def mask_with_next_token(n_q, n_k):
    return np.tril(np.ones((n_q, n_k), dtype=bool), k=n_k - n_q + 1)


def mask_from_top_left(n_q, n_k):
    return np.tril(np.ones((n_q, n_k), dtype=bool))


def learner_attention(q, k, v, mask, *, tile=False, scale=None, fill=MIN, softmax_axis=-1):
    """How a learner writes it: expand k/v to every query head, scores, mask, softmax, weighted sum."""
    group = q.shape[1] // k.shape[1]
    if tile:
        k, v = np.tile(k, (1, group, 1, 1)), np.tile(v, (1, group, 1, 1))
    else:
        k, v = np.repeat(k, group, axis=1), np.repeat(v, group, axis=1)
    d = q.shape[-1]
    scores = (q @ k.transpose(0, 1, 3, 2)) * (d**-0.5 if scale is None else scale)
    scores = np.where(mask[:, None], scores, fill)
    scores = scores - scores.max(axis=softmax_axis, keepdims=True)
    p = np.exp(scores)
    p = p / p.sum(axis=softmax_axis, keepdims=True)
    return (p @ v).astype(np.float32)


def attention_tiled(q, k, v, mask):
    return learner_attention(q, k, v, mask, tile=True)


def attention_scaled_by_d(q, k, v, mask):
    return learner_attention(q, k, v, mask, scale=1 / q.shape[-1])


def attention_masked_with_zero(q, k, v, mask):
    return learner_attention(q, k, v, mask, fill=0.0)


def attention_masked_with_inf(q, k, v, mask):
    with np.errstate(invalid="ignore"):
        return learner_attention(q, k, v, mask, fill=-np.inf)


def attention_softmax_over_queries(q, k, v, mask):
    return learner_attention(q, k, v, mask, softmax_axis=-2)


def test_learner_attention_is_right_when_nothing_is_planted(solutions):
    # the planted variants below differ from this one in exactly one knob
    course = solutions.with_overrides("ch05", attention=learner_attention)
    for checkpoint in (grading.test_attention_one_head, grading.test_grouped_query_attention,
                       grading.test_attention_cache, grading.test_attention_padding):  # fmt: skip
        checkpoint(course)


def test_softmax_ignoring_axis_is_caught(solutions, assert_caught):
    buggy = solutions.with_overrides("ch05", softmax=softmax_last_axis_only)
    assert_caught(grading.test_softmax, buggy, hint="whatever `axis` says")


def test_softmax_without_max_is_caught(solutions, assert_caught):
    buggy = solutions.with_overrides("ch05", softmax=softmax_without_max)
    grading.test_softmax(buggy)  # ordinary inputs do not show it
    message = assert_caught(grading.test_softmax_stable, buggy, hint="no max subtraction")
    assert "NaN" in message


def test_mask_without_diagonal_is_caught(solutions, assert_caught):
    buggy = solutions.with_overrides("ch05", causal_mask=mask_without_diagonal)
    assert_caught(grading.test_causal_mask, buggy, hint="diagonal is excluded")


def test_mask_with_future_token_is_caught(solutions, assert_caught):
    buggy = solutions.with_overrides("ch05", causal_mask=mask_with_next_token)
    assert_caught(grading.test_causal_mask, buggy, hint="future key is included")


def test_mask_without_cache_offset_is_caught(solutions, assert_caught):
    buggy = solutions.with_overrides("ch05", causal_mask=mask_from_top_left)
    grading.test_causal_mask(buggy)  # square masks do not show it
    assert_caught(grading.test_causal_mask_cache, buggy, hint="cache offset is missing")
    # the learner's mask runs inside the model: without a cache (prefill only) the logits are right...
    grading.test_real_model(buggy)
    # ...but batched generation decodes through the cache, where np.tril without the offset shows
    assert_caught(grading.test_real_model_batch, buggy, hint="ignores the cache offset (np.tril")


def test_mask_off_by_one_is_caught_in_the_model(solutions, assert_caught):
    assert_caught(grading.test_real_model, solutions.with_overrides("ch05", causal_mask=mask_without_diagonal),
                  hint="excludes the diagonal")  # fmt: skip
    assert_caught(grading.test_real_model, solutions.with_overrides("ch05", causal_mask=mask_with_next_token),
                  hint="one future key")  # fmt: skip


def test_tiled_gqa_is_caught(solutions, assert_caught):
    buggy = solutions.with_overrides("ch05", attention=attention_tiled)
    grading.test_attention_one_head(buggy)  # one kv head per query head: no grouping to get wrong
    assert_caught(grading.test_grouped_query_attention, buggy, hint="h // 2")
    assert_caught(grading.test_real_model, buggy, hint="grouped the wrong way")


def test_scale_by_d_is_caught(solutions, assert_caught):
    buggy = solutions.with_overrides("ch05", attention=attention_scaled_by_d)
    assert_caught(grading.test_attention_one_head, buggy, hint="1/d instead of 1/sqrt(d)")


def test_masking_with_zero_is_caught(solutions, assert_caught):
    buggy = solutions.with_overrides("ch05", attention=attention_masked_with_zero)
    assert_caught(grading.test_attention_one_head, buggy, hint="set to 0 instead of a very negative number")


def test_masking_with_minus_inf_is_caught(solutions, assert_caught):
    buggy = solutions.with_overrides("ch05", attention=attention_masked_with_inf)
    grading.test_attention_cache(buggy)  # every query sees at least one key: -inf is harmless here
    assert_caught(grading.test_attention_padding, buggy, hint="masked with -inf")
    # and in a real left-padded batch the NaN of the padding rows reaches the real tokens
    assert_caught(grading.test_real_model_batch, buggy, hint="the NaN reached the real tokens")


def test_softmax_over_queries_is_caught(solutions, assert_caught):
    buggy = solutions.with_overrides("ch05", attention=attention_softmax_over_queries)
    assert_caught(grading.test_attention_one_head, buggy, hint="softmax over the queries")
    # in the whole model even position 0 is wrong, and the hint says why
    message = assert_caught(grading.test_real_model, buggy, hint="softmax was taken over the queries")
    assert "position 0 is already wrong" in message and "wrong axis" in message


@pytest.mark.parametrize("name", ["softmax", "causal_mask", "attention"])
def test_stub_docstring_examples_hold_for_the_solutions(name):
    """The worked example in each stub's docstring is right: it passes with the solution in place of the stub."""
    globs = {
        "np": np,
        **{k: getattr(solutions_ch05, k) for k in dir(solutions_ch05) if not k.startswith("_")},
    }
    tests = doctest.DocTestFinder().find(getattr(stubs, name), name, globs=globs)
    assert tests and tests[0].examples, f"{name}: its docstring has no worked example"
    runner = doctest.DocTestRunner(optionflags=doctest.NORMALIZE_WHITESPACE)
    for test in tests:
        runner.run(test)
    assert runner.failures == 0


def attention_without_softmax(q, k, v, mask):
    group = q.shape[1] // k.shape[1]
    k, v = np.repeat(k, group, axis=1), np.repeat(v, group, axis=1)
    scores = (q @ k.transpose(0, 1, 3, 2)) * q.shape[-1] ** -0.5
    return (np.where(mask[:, None], scores, 0) @ v).astype(np.float32)


def test_scores_used_as_weights_is_caught(solutions, assert_caught):
    buggy = solutions.with_overrides("ch05", attention=attention_without_softmax)
    assert_caught(
        grading.test_attention_one_head, buggy, hint="without a softmax (scores, not probabilities)"
    )
