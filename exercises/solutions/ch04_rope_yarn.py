"""Chapter 4 solutions: thin adapters to tinyqwen's own RoPE/YaRN (tinyqwen/rope.py), so solutions mode grades it."""

from __future__ import annotations

import numpy as np

from tinyqwen import rope
from tinyqwen.config import RopeScaling


def rope_inv_freq(head_dim: int, theta: float) -> np.ndarray:  # -> [head_dim // 2] float32
    return rope.default_inv_freq(head_dim, theta)


def rope_cos_sin(
    positions: np.ndarray, inv_freq: np.ndarray, attention_factor: float = 1.0
) -> tuple[np.ndarray, np.ndarray]:  # [..., T], [d/2] -> [..., T, d] x2
    return rope.rope_cos_sin(np.asarray(positions), np.asarray(inv_freq, dtype=np.float32), attention_factor)


def rotate_half(x: np.ndarray) -> np.ndarray:  # [..., d] -> [..., d]
    return rope.rotate_half(x)


def apply_rope(x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    # [B, heads, T, d], [B, T, d] x2 -> [B, heads, T, d]
    return rope.apply_rope(x, cos, sin)


def yarn_inv_freq(
    head_dim: int,
    theta: float,
    factor: float,
    original_max_position_embeddings: int,
    beta_fast: float = 32.0,
    beta_slow: float = 1.0,
) -> np.ndarray:  # -> [head_dim // 2] float32
    scaling = RopeScaling(factor, original_max_position_embeddings, beta_fast, beta_slow)
    return rope.yarn_inv_freq(head_dim, theta, scaling)


def yarn_attention_factor(factor: float) -> float:
    # only `factor` matters for the default attention factor; the window size is not used
    return rope.yarn_attention_factor(RopeScaling(factor, original_max_position_embeddings=0))
