"""Planted mistakes for chapter 13: classic backward-pass and optimizer bugs, injected into the solutions, must fail
the grading with their hint — including inside the real model, where a wrong softmax or RMSNorm backward must
show up in the whole Qwen3-MoE's gradients."""

from __future__ import annotations

import numpy as np

import exercises.solutions.ch13_training as solution
import exercises.test_ch13_training as grading
from tinyqwen.attention import softmax


def softmax_backward_no_subtraction(dy, y):
    return dy * y


def rms_norm_backward_layernorm_style(dy, x, weight, eps):
    r = 1 / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps)
    x_hat, g = x * r, dy * weight
    dx = r * (g - g.mean(-1, keepdims=True) - x_hat * np.mean(g * x_hat, axis=-1, keepdims=True))
    return dx, (dy * x_hat).reshape(-1, x.shape[-1]).sum(0)


def cross_entropy_backward_summed(logits, targets):
    keep = targets != -100
    d = softmax(logits)
    d[np.arange(len(targets)), np.where(keep, targets, 0)] -= 1
    return d * keep[:, None]  # no division by the number of counted rows


def route_backward_skips_renorm(dweights, router_logits, experts, norm_topk_prob):
    return solution.route_backward(dweights, router_logits, experts, False)


def aux_backward_per_layer_always(router_logits, num_experts, top_k, scope="global"):
    return solution.load_balancing_loss_backward(router_logits, num_experts, top_k, "layer")


def aux_backward_layers_summed(router_logits, num_experts, top_k, scope="global"):
    d = solution.load_balancing_loss_backward(router_logits, num_experts, top_k, scope)
    return [a * (len(router_logits) if scope == "layer" else 1) for a in d]


def adamw_coupled(p, g, m, v, step, lr, beta1, beta2, eps, weight_decay):
    return solution.adamw_step(p, g + weight_decay * p, m, v, step, lr, beta1, beta2, eps, 0.0)


def adamw_in_place(p, g, m, v, step, lr, beta1, beta2, eps, weight_decay):
    new = solution.adamw_step(p, g, m, v, step, lr, beta1, beta2, eps, weight_decay)
    p[...], m[...], v[...] = new
    return p, m, v


def test_softmax_without_subtraction(solutions, assert_caught):
    buggy = solutions.with_overrides("ch13", softmax_backward=softmax_backward_no_subtraction)
    assert_caught(grading.test_softmax_backward, buggy, hint="subtraction is missing")
    assert_caught(grading.test_your_backward_in_the_real_model, buggy, hint="dL/d")


def test_rms_norm_layernorm_style(solutions, assert_caught):
    buggy = solutions.with_overrides("ch13", rms_norm_backward=rms_norm_backward_layernorm_style)
    assert_caught(grading.test_rms_norm_backward, buggy, hint="LayerNorm")
    assert_caught(grading.test_your_backward_in_the_real_model, buggy, hint="dL/d")


def test_cross_entropy_summed(solutions, assert_caught):
    buggy = solutions.with_overrides("ch13", cross_entropy_backward=cross_entropy_backward_summed)
    assert_caught(grading.test_cross_entropy_backward, buggy, hint="summed, not averaged")


def test_route_backward_skipping_the_renormalisation(solutions, assert_caught):
    buggy = solutions.with_overrides("ch13", route_backward=route_backward_skips_renorm)
    assert_caught(grading.test_route_backward_renormalised, buggy, hint="skips the renormalisation")
    grading.test_route_backward_plain(buggy)  # not a bug without renormalisation: must pass


def test_aux_backward_not_pooled(solutions, assert_caught):
    buggy = solutions.with_overrides("ch13", load_balancing_loss_backward=aux_backward_per_layer_always)
    assert_caught(grading.test_aux_loss_backward_pooled, buggy, hint="per-layer scope")
    grading.test_aux_loss_backward_per_layer(buggy)  # right for the per-layer scope: must pass


def test_aux_backward_layers_summed(solutions, assert_caught):
    buggy = solutions.with_overrides("ch13", load_balancing_loss_backward=aux_backward_layers_summed)
    assert_caught(grading.test_aux_loss_backward_per_layer, buggy, hint="summed, not averaged")
    grading.test_aux_loss_backward_pooled(buggy)


def test_adamw_with_l2_instead_of_decoupled_decay(solutions, assert_caught):
    buggy = solutions.with_overrides("ch13", adamw_step=adamw_coupled)
    assert_caught(grading.test_adamw_step, buggy, hint="Adam with L2")


def test_adamw_modifying_its_inputs(solutions, assert_caught):
    buggy = solutions.with_overrides("ch13", adamw_step=adamw_in_place)
    assert_caught(grading.test_adamw_step, buggy, hint="must not modify")
