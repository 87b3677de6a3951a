"""Chapter 6 solutions: SwiGLU, the decoder layer and the whole dense model, written out with the earlier chapters'
solutions (tinyqwen/mlp.py and tinyqwen/model.py are the library's versions)."""

from __future__ import annotations

import numpy as np

from exercises.solutions.ch03_embeddings_rmsnorm import embed, rms_norm
from exercises.solutions.ch04_rope_yarn import (
    apply_rope,
    rope_cos_sin,
    rope_inv_freq,
    yarn_attention_factor,
    yarn_inv_freq,
)
from exercises.solutions.ch05_attention import attention, causal_mask
from tinyqwen.config import Qwen3Config


def silu(z: np.ndarray) -> np.ndarray:  # [...] -> [...]
    # z / (1 + e^-z) rather than z * sigmoid(z): at z = -1000, e^-z overflows to inf and z / inf is a clean -0.0
    with np.errstate(over="ignore"):
        return z / (1 + np.exp(-z))


def linear(x: np.ndarray, w: np.ndarray) -> np.ndarray:  # [..., d_in], [d_out, d_in] -> [..., d_out]
    return x @ w.T  # checkpoints store [out, in]: transpose the view, never the data


def swiglu(x: np.ndarray, w_gate: np.ndarray, w_up: np.ndarray, w_down: np.ndarray) -> np.ndarray:
    # [..., d], [f, d], [f, d], [d, f] -> [..., d]; the SiLU goes on the gate, never on the up projection
    return linear(silu(linear(x, w_gate)) * linear(x, w_up), w_down)


def decoder_layer(
    x: np.ndarray,  # [B, T, hidden]
    weights: dict[str, np.ndarray],
    cos: np.ndarray,  # [B, T, head_dim]
    sin: np.ndarray,  # [B, T, head_dim]
    mask: np.ndarray,  # [B, T, T] bool
    head_dim: int,
    eps: float,
) -> np.ndarray:  # -> [B, T, hidden]
    w = weights
    B, T, _ = x.shape
    h = rms_norm(x, w["input_layernorm.weight"], eps)  # pre-norm: the residual stream itself is never normed
    q = linear(h, w["self_attn.q_proj.weight"]).reshape(B, T, -1, head_dim)  # [B, T, Hq, hd]
    k = linear(h, w["self_attn.k_proj.weight"]).reshape(B, T, -1, head_dim)  # [B, T, Hkv, hd]
    v = linear(h, w["self_attn.v_proj.weight"]).reshape(B, T, -1, head_dim)  # [B, T, Hkv, hd]
    q = rms_norm(q, w["self_attn.q_norm.weight"], eps)  # QK-Norm: over head_dim, per head, BEFORE RoPE
    k = rms_norm(k, w["self_attn.k_norm.weight"], eps)
    q = apply_rope(q.transpose(0, 2, 1, 3), cos, sin)  # [B, Hq, T, hd]
    k = apply_rope(k.transpose(0, 2, 1, 3), cos, sin)  # [B, Hkv, T, hd]
    out = attention(q, k, v.transpose(0, 2, 1, 3), mask)  # [B, Hq, T, hd]
    out = out.transpose(0, 2, 1, 3).reshape(B, T, -1)  # [B, T, Hq·hd] heads merged back
    x = x + linear(out, w["self_attn.o_proj.weight"])  # a new array: the caller's x is left untouched
    h = rms_norm(x, w["post_attention_layernorm.weight"], eps)
    mlp = swiglu(h, w["mlp.gate_proj.weight"], w["mlp.up_proj.weight"], w["mlp.down_proj.weight"])
    return x + mlp


def lm_head_weight(weights: dict[str, np.ndarray], tie_word_embeddings: bool) -> np.ndarray:
    # tied: the head IS the embedding table, the same array (a copy would double 0.6B's largest matrix)
    return weights["model.embed_tokens.weight"] if tie_word_embeddings else weights["lm_head.weight"]


def rope_tables(config: Qwen3Config, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    # [B, T] -> cos, sin [B, T, head_dim]: plain RoPE, or YaRN when the config asks for it
    s = config.rope_scaling
    if s is None:
        return rope_cos_sin(positions, rope_inv_freq(config.head_dim, config.rope_theta))
    inv_freq = yarn_inv_freq(config.head_dim, config.rope_theta, s.factor, s.original_max_position_embeddings,
                             s.beta_fast, s.beta_slow)  # fmt: skip
    return rope_cos_sin(positions, inv_freq, yarn_attention_factor(s.factor))


def forward(ids: np.ndarray, weights: dict[str, np.ndarray], config: Qwen3Config) -> np.ndarray:
    # [B, T] int -> logits [B, T, vocab]
    c = config
    ids = np.asarray(ids)
    B, T = ids.shape
    positions = np.broadcast_to(np.arange(T), (B, T))  # [B, T] no padding here: every row starts at 0
    cos, sin = rope_tables(c, positions)  # [B, T, hd] x2
    mask = np.broadcast_to(causal_mask(T, T), (B, T, T))  # [B, T, T]
    x = embed(ids, weights["model.embed_tokens.weight"])  # [B, T, hidden]
    for i in range(c.num_hidden_layers):
        prefix = f"model.layers.{i}."
        layer = {name[len(prefix) :]: a for name, a in weights.items() if name.startswith(prefix)}
        x = decoder_layer(x, layer, cos, sin, mask, c.head_dim, c.rms_norm_eps)
    x = rms_norm(x, weights["model.norm.weight"], c.rms_norm_eps)  # the final norm, before the head
    return linear(x, lm_head_weight(weights, c.tie_word_embeddings))  # [B, T, vocab]


def count_parameters(config: Qwen3Config) -> int:
    c = config
    h, d = c.hidden_size, c.head_dim
    attention_params = h * d * (2 * c.num_attention_heads + 2 * c.num_key_value_heads)  # q, o; k, v
    per_layer = attention_params + 2 * d + 2 * h + 3 * h * c.intermediate_size  # + q/k norms, 2 norms, MLP
    head = 0 if c.tie_word_embeddings else c.vocab_size * h  # a tied head is the embedding: counted once
    return c.vocab_size * h + c.num_hidden_layers * per_layer + h + head  # + final norm
