"""Capstone of part IV (chapters 6-11): resource accounting, graded by the number.

Before you run a model, you can know what it costs: how many parameters it has, how many a token actually uses,
how many floating-point operations a token takes, how big its KV cache grows, and how fast a given machine can
at best decode it. Here you compute each for the official Qwen3 configs (tinyqwen/data/configs/*.json: 0.6B, 4B,
8B dense; 30B-A3B mixture of experts). Grade with

    pytest exercises/test_ch16_resource_accounting.py

`config` is always a config.json as a dict. The conventions below are what is graded; how to count is yours
(chapters 6, 7, 8 and 10 have every piece). The exact answers are in the test file, each as the arithmetic that
derives it from the config (and the parameter totals also as transformers counts them).
"""

from __future__ import annotations


def total_parameters(config: dict) -> int:
    """Every parameter of the checkpoint, norms included; a tied output head counted once (it IS the embedding).

    Qwen3-0.6B has about 0.6 billion; Qwen3-30B-A3B about 30.5 billion.
    """
    raise NotImplementedError


def active_parameters(config: dict) -> int:
    """The parameters one token's forward pass uses: all of them for a dense model; for a mixture of experts, the
    total minus the experts the router did NOT pick (each sparse layer runs num_experts_per_tok of num_experts).
    The embedding table counts in full (this is the "A3B" of Qwen3-30B-A3B: about 3.3 billion active).
    """
    raise NotImplementedError


def forward_flops_per_token(config: dict, context: int) -> int:
    """Floating-point operations of one token's forward pass when it attends to `context` keys (itself included).

    Count 2 operations per multiply-add. Count every matrix product: each weight matrix the token is multiplied by
    (for a sparse layer: the router and the chosen experts only; the output head; NOT the embedding, which is a
    row lookup), and attention's two products with the keys and the values of each query head. Leave out
    everything elementwise or per-row (norms, RoPE, softmax, SiLU, the residual adds): it is under 1% here.
    """
    raise NotImplementedError


def kv_cache_bytes_per_token(config: dict, bytes_per_value: int) -> int:
    """Bytes one token adds to the KV cache of one sequence, for numbers of `bytes_per_value` bytes (2 for bf16)."""
    raise NotImplementedError


def kv_cache_bytes(config: dict, context: int, bytes_per_value: int, batch: int = 1) -> int:
    """Bytes of the KV cache holding `context` tokens for each of `batch` sequences."""
    raise NotImplementedError


def decode_tokens_per_second(
    config: dict, context: int, bandwidth_gb_s: float, bytes_per_weight: float, bytes_per_kv_value: int
) -> float:
    """The bandwidth-bound ceiling of single-sequence decode: tokens per second when every byte a step must read
    moves at `bandwidth_gb_s` (10⁹ bytes per second) and nothing else takes time.

    A decode step (batch 1) with `context` tokens in the cache (the new one included) reads each weight matrix it
    multiplies by once (the matrices forward_flops_per_token counts), at `bytes_per_weight` bytes each, and the
    whole KV cache of `context` tokens. Ignore the norms, the one embedding row and the activations.

    The graded machines: an H100 SXM (3,350 GB/s of HBM3, NVIDIA's datasheet figure) and a laptop with
    dual-channel DDR5-5600 (2 channels × 8 bytes × 5.6 GT/s = 89.6 GB/s), weights and cache in bf16.
    """
    raise NotImplementedError
