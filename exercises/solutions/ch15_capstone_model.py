"""Capstone solution: Qwen3 from the math, one decoder layer (dense or MoE) and the whole forward pass, built from
the chapters' solutions (chapters 3-7)."""

from __future__ import annotations

import numpy as np

from exercises.solutions.ch03_embeddings_rmsnorm import embed, rms_norm
from exercises.solutions.ch05_attention import attention
from exercises.solutions.ch06_dense_model import linear, rope_tables, swiglu
from exercises.solutions.ch07_mixture_of_experts import moe_block
from tinyqwen.config import Qwen3Config


def decoder_layer(
    x: np.ndarray, weights: dict[str, np.ndarray], config: Qwen3Config, positions: np.ndarray
) -> np.ndarray:  # [B, T, H], {name: array}, config, [B, T] -> [B, T, H]
    c, w = config, weights
    B, T, H = x.shape
    cos, sin = rope_tables(c, positions)  # [B, T, hd] x2 from each token's own position
    mask = np.broadcast_to(
        np.tril(np.ones((T, T), dtype=bool)), (B, T, T)
    )  # no cache: a plain lower triangle
    h = rms_norm(x, w["input_layernorm.weight"], c.rms_norm_eps)
    q, k, v = (linear(h, w[f"self_attn.{p}_proj.weight"]).reshape(B, T, -1, c.head_dim) for p in "qkv")
    q = rms_norm(q, w["self_attn.q_norm.weight"], c.rms_norm_eps)  # QK-Norm per head, before RoPE
    k = rms_norm(k, w["self_attn.k_norm.weight"], c.rms_norm_eps)
    q, k, v = q.transpose(0, 2, 1, 3), k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # heads first
    q, k = (
        q * cos[:, None] + _rotate_half(q) * sin[:, None],
        k * cos[:, None] + _rotate_half(k) * sin[:, None],
    )
    out = attention(q, k, v, mask).transpose(0, 2, 1, 3).reshape(B, T, -1)  # [B, T, Hq·hd]
    x = x + linear(out, w["self_attn.o_proj.weight"])
    h = rms_norm(x, w["post_attention_layernorm.weight"], c.rms_norm_eps)
    if "mlp.gate.weight" in w:  # a sparse layer: route each token to its top-k experts
        E = w["mlp.gate.weight"].shape[0]
        stack = [
            np.stack([w[f"mlp.experts.{e}.{p}_proj.weight"] for e in range(E)])
            for p in ("gate", "up", "down")
        ]
        y, _ = moe_block(
            h.reshape(B * T, H), w["mlp.gate.weight"], *stack, c.num_experts_per_tok, c.norm_topk_prob
        )
        return x + y.reshape(B, T, H)
    return x + swiglu(h, w["mlp.gate_proj.weight"], w["mlp.up_proj.weight"], w["mlp.down_proj.weight"])


def _rotate_half(x: np.ndarray) -> np.ndarray:  # [..., d] -> [..., d]
    half = x.shape[-1] // 2
    return np.concatenate([-x[..., half:], x[..., :half]], axis=-1)


def forward(ids: np.ndarray, weights: dict[str, np.ndarray], config: Qwen3Config) -> np.ndarray:
    c = config
    ids = np.asarray(ids)
    B, T = ids.shape
    positions = np.broadcast_to(np.arange(T), (B, T))
    x = embed(ids, weights["model.embed_tokens.weight"])  # [B, T, H]
    for i in range(c.num_hidden_layers):
        prefix = f"model.layers.{i}."
        layer = {n[len(prefix) :]: a for n, a in weights.items() if n.startswith(prefix)}
        x = decoder_layer(x, layer, c, positions)
    x = rms_norm(x, weights["model.norm.weight"], c.rms_norm_eps)
    head = weights["model.embed_tokens.weight"] if c.tie_word_embeddings else weights["lm_head.weight"]
    return linear(x, head)  # [B, T, vocab]
