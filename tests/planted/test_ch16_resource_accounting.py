"""Planted mistakes for resource accounting: classic counting slips must fail with the slip named."""

from __future__ import annotations

import exercises.solutions.ch16_resource_accounting as solution
import exercises.test_ch16_resource_accounting as grading


def kv_with_query_heads(config, bytes_per_value):
    return solution.kv_cache_bytes_per_token(dict(config, num_key_value_heads=config["num_attention_heads"]),
                                             bytes_per_value)  # fmt: skip


def flops_one_per_mac(config, context):
    return solution.forward_flops_per_token(config, context) // 2


def active_counts_every_expert(config):
    return solution.total_parameters(config)


def decode_in_gib(config, context, bandwidth_gb_s, bytes_per_weight, bytes_per_kv_value):
    return solution.decode_tokens_per_second(config, context, bandwidth_gb_s * 2**30 / 1e9, bytes_per_weight,
                                             bytes_per_kv_value)  # fmt: skip


def total_tied_twice(config):
    extra = config["vocab_size"] * config["hidden_size"] if config.get("tie_word_embeddings") else 0
    return solution.total_parameters(config) + extra


def test_kv_query_heads(solutions, assert_caught):
    buggy = solutions.with_overrides("ch16", kv_cache_bytes_per_token=kv_with_query_heads)
    assert_caught(grading.test_kv_cache, buggy, hint="kv heads")


def test_flops_per_mac(solutions, assert_caught):
    buggy = solutions.with_overrides("ch16", forward_flops_per_token=flops_one_per_mac)
    assert_caught(grading.test_forward_flops_per_token, buggy, hint="multiply-add")


def test_active_all_experts(solutions, assert_caught):
    buggy = solutions.with_overrides("ch16", active_parameters=active_counts_every_expert)
    assert_caught(grading.test_active_parameters, buggy, hint="every expert")


def test_decode_gib(solutions, assert_caught):
    buggy = solutions.with_overrides("ch16", decode_tokens_per_second=decode_in_gib)
    assert_caught(grading.test_decode_ceiling, buggy, hint="GiB/s")


def test_tied_twice(solutions, assert_caught):
    buggy = solutions.with_overrides("ch16", total_parameters=total_tied_twice)
    assert_caught(grading.test_total_parameters, buggy, hint="tied head")
