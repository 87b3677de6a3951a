"""Planted mistakes for chapter 7: classic learner bugs, injected into the solutions, must fail with their hint.

One planted change is NOT a bug — weighting an expert's hidden activation before `down` instead of its output
after `down` (the same thing, `down` being linear) — and must pass every checkpoint it touches.
"""

from __future__ import annotations

import doctest
from pathlib import Path

import numpy as np
import pytest

import exercises.ch07_mixture_of_experts as stubs
import exercises.solutions.ch07_mixture_of_experts as solution
import exercises.test_ch07_mixture_of_experts as grading
from tinyqwen.attention import softmax
from tinyqwen.mlp import linear, silu, swiglu

# the real-model checkpoint runs the solutions of chapters 3-5 too: they arrive with those chapters' branches
REPO = Path(__file__).resolve().parents[2]
NEEDS_CHAPTERS_3_TO_5 = pytest.mark.skipif(
    not all(any((REPO / "exercises" / "solutions").glob(f"ch{n:02d}_*.py")) for n in (3, 4, 5)),
    reason="exercises/solutions/ch03-ch05 are not in this checkout yet",
)


def route_topk_then_softmax(router_logits, top_k, norm_topk_prob):
    experts = np.argsort(-router_logits, axis=-1, kind="stable")[:, :top_k]
    return softmax(np.take_along_axis(router_logits, experts, axis=-1)), experts  # softmax over the k only


def route_never_renormalised(router_logits, top_k, norm_topk_prob):
    return solution.route(router_logits, top_k, False)


def _block(route_fn, weight_before_down: bool = False):
    def moe_block(x, w_router, w_gate, w_up, w_down, top_k, norm_topk_prob):
        router_logits = linear(x, w_router)
        weights, experts = route_fn(router_logits, top_k, norm_topk_prob)
        out = np.zeros_like(x)
        for e in range(len(w_router)):
            token, slot = np.nonzero(experts == e)
            w = weights[token, slot, None]
            if weight_before_down:
                hidden = silu(linear(x[token], w_gate[e])) * linear(x[token], w_up[e])
                out[token] += linear(w * hidden, w_down[e])
            else:
                out[token] += w * swiglu(x[token], w_gate[e], w_up[e], w_down[e])
        return out, router_logits

    return moe_block


def route_always_renormalised(router_logits, top_k, norm_topk_prob):
    return solution.route(router_logits, top_k, True)


def is_moe_layer_off_by_one(layer, num_experts, decoder_sparse_step, mlp_only_layers):
    return num_experts > 0 and layer not in mlp_only_layers and layer % decoder_sparse_step == 0


def is_moe_layer_ignores_mlp_only(layer, num_experts, decoder_sparse_step, mlp_only_layers):
    return num_experts > 0 and (layer + 1) % decoder_sparse_step == 0


def _loss(f_scale=1.0, p_topk_only=False, per_layer=False):
    def load_balancing_loss(router_logits, num_experts, top_k):
        if per_layer:
            return float(
                np.mean([solution.load_balancing_loss([r], num_experts, top_k) for r in router_logits])
            )
        logits = np.concatenate([np.asarray(r, np.float32).reshape(-1, num_experts) for r in router_logits])
        probs = softmax(logits)
        _, experts = solution.route(logits, top_k, False)
        chosen = np.zeros_like(probs)
        np.put_along_axis(chosen, experts, 1.0, axis=1)
        f = chosen.mean(0) * f_scale
        P = (probs * chosen).mean(0) if p_topk_only else probs.mean(0)
        return float(num_experts * np.sum(f * P))

    return load_balancing_loss


def test_softmax_over_topk_only(solutions, assert_caught):
    course = solutions.with_overrides("ch07", route=route_topk_then_softmax)
    assert_caught(grading.test_route, course, hint="softmax was taken over the k chosen logits only")
    # with norm_topk_prob the two orders agree (the notebook derives it): that checkpoint must still pass
    grading.test_route_renormalised(course)


def test_forgot_to_renormalise(solutions, assert_caught):
    course = solutions.with_overrides("ch07", route=route_never_renormalised)
    assert_caught(grading.test_route_renormalised, course, hint="not renormalised")
    assert_caught(grading.test_route_other_k, course, hint="not renormalised")
    block = solutions.with_overrides("ch07", moe_block=_block(route_never_renormalised))
    assert_caught(grading.test_moe_block, block, hint="not renormalised")


def test_renormalised_when_not_asked(solutions, assert_caught):
    course = solutions.with_overrides("ch07", moe_block=_block(route_always_renormalised))
    assert_caught(grading.test_moe_block_plain, course, hint="renormalised although norm_topk_prob is False")


@NEEDS_CHAPTERS_3_TO_5
def test_buggy_block_breaks_the_real_model(solutions, assert_caught):
    course = solutions.with_overrides("ch07", moe_block=_block(route_always_renormalised))
    assert_caught(grading.test_real_model, course, hint="per-token pieces")


def test_weighting_before_down_is_not_a_bug(solutions):
    course = solutions.with_overrides("ch07", moe_block=_block(solution.route, weight_before_down=True))
    grading.test_moe_block(course)
    grading.test_moe_block_plain(course)


@NEEDS_CHAPTERS_3_TO_5
def test_weighting_before_down_is_not_a_bug_in_the_model(solutions):
    course = solutions.with_overrides("ch07", moe_block=_block(solution.route, weight_before_down=True))
    grading.test_real_model(course)


def test_sparse_step_off_by_one(solutions, assert_caught):
    course = solutions.with_overrides("ch07", is_moe_layer=is_moe_layer_off_by_one)
    assert_caught(grading.test_is_moe_layer, course, hint="(layer + 1) % step")


def test_mlp_only_layers_ignored(solutions, assert_caught):
    course = solutions.with_overrides("ch07", is_moe_layer=is_moe_layer_ignores_mlp_only)
    assert_caught(grading.test_is_moe_layer, course, hint="mlp_only_layers is ignored")


@pytest.mark.parametrize(
    ("loss", "hint"),
    [
        (_loss(f_scale=0.5), "divided by top_k"),  # top_k = 2 in the balanced and collapsed cases
        (_loss(p_topk_only=True), "chosen (top-k) probabilities only"),
    ],
)
def test_loss_mistakes(solutions, assert_caught, loss, hint):
    assert_caught(
        grading.test_load_balancing_loss,
        solutions.with_overrides("ch07", load_balancing_loss=loss),
        hint=hint,
    )


def test_loss_per_layer_mean(solutions, assert_caught):
    course = solutions.with_overrides("ch07", load_balancing_loss=_loss(per_layer=True))
    assert_caught(grading.test_load_balancing_loss_layers, course, hint="Pool all layers' rows")


@pytest.mark.parametrize("name", ["route", "moe_block", "is_moe_layer", "load_balancing_loss"])
def test_stub_examples_hold(name):
    """The worked examples in the stubs' docstrings are right (run against the solutions)."""
    test = doctest.DocTestParser().get_doctest(
        getattr(stubs, name).__doc__, {"np": np, name: getattr(solution, name)}, name, None, 0
    )
    runner = doctest.DocTestRunner()
    runner.run(test)
    assert runner.summarize(verbose=False).failed == 0


def route_smallest(router_logits, top_k, norm_topk_prob):  # argsort ascending, read from the wrong end
    probs = softmax(np.asarray(router_logits, np.float32))
    experts = np.argsort(probs, axis=-1, kind="stable")[:, :top_k]
    weights = np.take_along_axis(probs, experts, axis=-1)
    if norm_topk_prob:
        weights = weights / weights.sum(-1, keepdims=True)
    return weights.astype(np.float32), experts


def test_route_sorted_the_wrong_way(solutions, assert_caught):
    course = solutions.with_overrides("ch07", route=route_smallest)
    assert_caught(grading.test_route, course, hint="SMALLEST probabilities")
    assert_caught(grading.test_route_renormalised, course, hint="SMALLEST probabilities")


def _loss_variant(top1_f=False, p_of_logits=False, f_counts=False):
    def load_balancing_loss(router_logits, num_experts, top_k):
        logits = np.concatenate([np.asarray(r, np.float32).reshape(-1, num_experts) for r in router_logits])
        probs = softmax(logits)
        _, experts = solution.route(logits, 1 if top1_f else top_k, False)
        chosen = np.zeros_like(probs)
        np.put_along_axis(chosen, experts, 1.0, axis=1)
        f = chosen.sum(0) if f_counts else chosen.mean(0)
        P = logits.mean(0) if p_of_logits else probs.mean(0)
        return float(num_experts * np.sum(f * P))

    return load_balancing_loss


@pytest.mark.parametrize(
    ("loss", "hint", "not_named"),
    [
        # on the balanced router both give 1.0 (top_k = 2 shares halved, or top-1 shares): the grader runs the
        # learner's loss on an unbalanced router too before naming one
        (_loss(f_scale=0.5), "divided by top_k", "Switch"),
        (_loss_variant(top1_f=True), "Switch Transformer's top-1 form", "divided by top_k"),
        (_loss_variant(p_of_logits=True), "router LOGITS, not the probabilities", None),
        (_loss_variant(f_counts=True), "counts instead of shares", None),
    ],
)
def test_loss_mistakes_told_apart(solutions, assert_caught, loss, hint, not_named):
    message = assert_caught(
        grading.test_load_balancing_loss,
        solutions.with_overrides("ch07", load_balancing_loss=loss),
        hint=hint,
    )
    if not_named:
        assert not_named not in message, message
