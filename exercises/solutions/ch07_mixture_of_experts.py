"""Chapter 7 solutions: thin adapters onto tinyqwen's own code (tinyqwen/moe.py, tinyqwen/config.py)."""

from __future__ import annotations

import numpy as np

from tinyqwen import moe
from tinyqwen.config import Qwen3Config


def route(router_logits: np.ndarray, top_k: int, norm_topk_prob: bool) -> tuple[np.ndarray, np.ndarray]:
    return moe.route(router_logits, top_k, norm_topk_prob)


def moe_block(
    x: np.ndarray,
    w_router: np.ndarray,
    w_gate: np.ndarray,
    w_up: np.ndarray,
    w_down: np.ndarray,
    top_k: int,
    norm_topk_prob: bool,
) -> tuple[np.ndarray, np.ndarray]:
    return moe.moe_block(x, w_router, w_gate, w_up, w_down, top_k, norm_topk_prob)


def is_moe_layer(layer: int, num_experts: int, decoder_sparse_step: int, mlp_only_layers: list[int]) -> bool:
    config = Qwen3Config(
        model_type="qwen3_moe", vocab_size=1, hidden_size=1, intermediate_size=1, num_hidden_layers=layer + 1,
        num_attention_heads=1, num_key_value_heads=1, head_dim=1, rms_norm_eps=1e-6, rope_theta=1e4,
        max_position_embeddings=1, tie_word_embeddings=True, num_experts=num_experts,
        num_experts_per_tok=min(1, num_experts), moe_intermediate_size=1, decoder_sparse_step=decoder_sparse_step,
        mlp_only_layers=tuple(mlp_only_layers),
    )  # fmt: skip
    return config.is_moe_layer(layer)


def load_balancing_loss(router_logits: list[np.ndarray], num_experts: int, top_k: int) -> float:
    return moe.load_balancing_loss(router_logits, num_experts, top_k)
