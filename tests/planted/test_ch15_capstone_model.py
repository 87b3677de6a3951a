"""Planted mistakes for the capstone (Qwen3 from the math): classic bugs must fail with the mistake named."""

from __future__ import annotations

import dataclasses

import numpy as np

import exercises.solutions.ch15_capstone_model as solution
import exercises.test_ch15_capstone_model as grading


def decoder_swapped_norms(x, w, config, positions):
    w = dict(w)
    w["input_layernorm.weight"], w["post_attention_layernorm.weight"] = (
        w["post_attention_layernorm.weight"],
        w["input_layernorm.weight"],
    )
    return solution.decoder_layer(x, w, config, positions)


def forward_ignoring_norm_topk(ids, weights, config):
    return solution.forward(
        ids, weights, dataclasses.replace(config, norm_topk_prob=not config.norm_topk_prob)
    )


def forward_ignoring_yarn(ids, weights, config):
    return solution.forward(ids, weights, dataclasses.replace(config, rope_scaling=None))


def _without_final_norm(ids, weights, config):
    B, T = ids.shape
    x = weights["model.embed_tokens.weight"][ids]
    for i in range(config.num_hidden_layers):
        p = f"model.layers.{i}."
        layer = {k[len(p) :]: v for k, v in weights.items() if k.startswith(p)}
        x = solution.decoder_layer(x, layer, config, np.broadcast_to(np.arange(T), (B, T)))
    head = weights["model.embed_tokens.weight"] if config.tie_word_embeddings else weights["lm_head.weight"]
    return x @ head.T


def test_swapped_norms(solutions, assert_caught):
    buggy = solutions.with_overrides("ch15", decoder_layer=decoder_swapped_norms)
    assert_caught(grading.test_decoder_layer, buggy, hint="swapped")


def test_norm_topk_ignored(solutions, assert_caught):
    buggy = solutions.with_overrides("ch15", forward=forward_ignoring_norm_topk)
    assert_caught(grading.test_forward_moe, buggy, hint="norm_topk_prob")


def test_yarn_ignored(solutions, assert_caught):
    buggy = solutions.with_overrides("ch15", forward=forward_ignoring_yarn)
    assert_caught(grading.test_forward_yarn, buggy, hint="YaRN")


def test_final_norm_missing(solutions, assert_caught):
    buggy = solutions.with_overrides("ch15", forward=_without_final_norm)
    assert_caught(grading.test_forward_dense, buggy, hint="final RMSNorm")
