"""Chapter 4 solutions: RoPE and YaRN written out (tinyqwen/rope.py is the library's version)."""

from __future__ import annotations

import math

import numpy as np


def _theta_powers(head_dim: int, theta: float) -> np.ndarray:  # -> [head_dim // 2] float32
    exponent = np.arange(0, head_dim, 2, dtype=np.float32) / np.float32(head_dim)  # 2i/d, float32 as torch
    # the power in float64, rounded once to float32: NumPy's float32 `**` differs from torch's in the last bit
    # for some pairs, and one ulp of a frequency is visible at positions ~40k
    return (np.float64(theta) ** exponent.astype(np.float64)).astype(np.float32)


def rope_inv_freq(head_dim: int, theta: float) -> np.ndarray:  # -> [head_dim // 2] float32
    return (np.float32(1.0) / _theta_powers(head_dim, theta)).astype(np.float32)  # 1 / theta^(2i/d)


def rope_cos_sin(
    positions: np.ndarray, inv_freq: np.ndarray, attention_factor: float = 1.0
) -> tuple[np.ndarray, np.ndarray]:  # [..., T], [d/2] -> [..., T, d] x2
    inv_freq = np.asarray(inv_freq, dtype=np.float32)
    # float32 angles, as transformers computes them (float64 would be "more right" and differ from it)
    angles = np.asarray(positions).astype(np.float32)[..., None] * inv_freq  # [..., T, d/2]
    angles = np.concatenate([angles, angles], axis=-1)  # [..., T, d] split-half: pair i is (i, i + d/2)
    scale = np.float32(attention_factor)  # YaRN's factor scales cos and sin (1 for plain RoPE)
    return np.cos(angles) * scale, np.sin(angles) * scale


def rotate_half(x: np.ndarray) -> np.ndarray:  # [..., d] -> [..., d]
    half = x.shape[-1] // 2
    return np.concatenate([-x[..., half:], x[..., :half]], axis=-1)  # (a, b) -> (-b, a): a quarter turn


def apply_rope(x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    # [B, heads, T, d], [B, T, d] x2 -> [B, heads, T, d]; every head turns by the same angles: add a head axis
    return x * cos[:, None] + rotate_half(x) * sin[:, None]


def yarn_inv_freq(
    head_dim: int,
    theta: float,
    factor: float,
    original_max_position_embeddings: int,
    beta_fast: float = 32.0,
    beta_slow: float = 1.0,
) -> np.ndarray:  # -> [head_dim // 2] float32

    def pair_turning(
        turns: float,
    ) -> float:  # the pair index whose wavelength fits `turns` turns in the window
        return (
            head_dim
            * math.log(original_max_position_embeddings / (turns * 2 * math.pi))
            / (2 * math.log(theta))
        )

    # fast pairs (many turns in the original window) keep their frequency; slow ones are divided by `factor`
    low = max(math.floor(pair_turning(beta_fast)), 0)
    high = min(math.ceil(pair_turning(beta_slow)), head_dim - 1)
    if low == high:
        high += 0.001  # transformers' guard against a zero-width ramp
    powers = _theta_powers(head_dim, theta)  # [d/2]
    original = np.float32(1.0) / powers
    interpolated = np.float32(1.0) / (np.float32(factor) * powers)
    ramp = np.clip(
        (np.arange(head_dim // 2, dtype=np.float32) - np.float32(low)) / np.float32(high - low), 0, 1
    )
    keep = np.float32(1.0) - ramp  # [d/2] 1 = keep the original frequency, 0 = fully interpolated
    return (interpolated * (np.float32(1.0) - keep) + original * keep).astype(np.float32)


def yarn_attention_factor(factor: float) -> float:
    return 1.0 if factor <= 1 else 0.1 * math.log(factor) + 1.0  # sharpen softmax a little as context grows
