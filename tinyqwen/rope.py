"""Rotary position embeddings (RoPE) and their YaRN extension to longer contexts.

RoPE encodes a token's position by rotating pairs of channels of each query and key by an angle proportional to
the position: pair i turns at frequency inv_freq[i] = theta ** (-2i / head_dim). A dot product q·k then depends only
on the *difference* of the two positions.

Qwen3 (like Llama and transformers) uses the "split-half" layout: channel j is paired with channel j + head_dim/2,
not with its neighbour j + 1. With head_dim = 4 and x = [x0, x1, x2, x3], the pairs are (x0, x2) and (x1, x3):

    rotate_half([x0, x1, x2, x3]) = [-x2, -x3, x0, x1]
    rope(x)                       = x * cos + rotate_half(x) * sin       (cos, sin = [c0, c1, c0, c1], [s0, s1, s0, s1])

YaRN (Peng et al., 2023) stretches the context window by `factor`: low-frequency pairs (long wavelengths, which
never completed a turn within the original training window) are interpolated — divided by `factor` — while
high-frequency pairs keep their frequency, with a linear ramp in between; cos and sin are then scaled by an
"attention factor" 0.1·ln(factor) + 1 that sharpens the softmax. We reproduce transformers' arithmetic exactly,
including doing it in float32.
"""

from __future__ import annotations

import math

import numpy as np

from tinyqwen.config import Qwen3Config, RopeScaling


def _theta_powers(head_dim: int, theta: float) -> np.ndarray:  # -> [head_dim // 2] float32
    """theta ** (2i / head_dim) for each pair, rounded once to float32 (transformers' `pos_freqs`).

    The exponents are float32, as transformers makes them. The power itself is taken in float64 and rounded to
    float32: NumPy's float32 `**` and torch's differ in the last bit for 14 of Qwen3-0.6B's 64 pairs, and at
    position 40,959 one ulp of inv_freq moves an angle by ~2e-3 rad. The correctly rounded value is what torch's
    float32 pow gives for all but one of them (pair 37, whose ulp moves an angle by only ~1e-5 rad at 131,072).
    """
    exponent = np.arange(0, head_dim, 2, dtype=np.float32) / np.float32(head_dim)
    return (np.float64(theta) ** exponent.astype(np.float64)).astype(np.float32)


def default_inv_freq(head_dim: int, theta: float) -> np.ndarray:  # -> [head_dim // 2]
    """inv_freq[i] = 1 / theta**(2i / head_dim), in float32 as transformers computes it.

    >>> default_inv_freq(4, 10000.0)
    array([1.  , 0.01], dtype=float32)
    """
    return (np.float32(1.0) / _theta_powers(head_dim, theta)).astype(np.float32)


def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def yarn_attention_factor(s: RopeScaling) -> float:
    """The factor cos and sin are multiplied by: 0.1·ln(factor)+1, unless the config gives one (or mscales)."""
    if s.attention_factor is not None:
        return float(s.attention_factor)
    if s.mscale and s.mscale_all_dim:
        return _yarn_mscale(s.factor, s.mscale) / _yarn_mscale(s.factor, s.mscale_all_dim)
    return _yarn_mscale(s.factor)


def yarn_inv_freq(head_dim: int, theta: float, s: RopeScaling) -> np.ndarray:  # -> [head_dim // 2]
    """Blend interpolated (inv_freq / factor) and original frequencies with a linear ramp over the pair index.

    The ramp runs between the pair indices whose wavelength fits `beta_fast` and `beta_slow` full turns into the
    original context: pairs turning faster than beta_fast times keep their frequency (extrapolation), pairs
    turning fewer than beta_slow times are fully interpolated.
    """

    def correction_dim(num_rotations: float) -> float:
        # the pair index i whose wavelength 2π/inv_freq[i] fits num_rotations turns into the original window
        return (head_dim * math.log(s.original_max_position_embeddings / (num_rotations * 2 * math.pi))) / (
            2 * math.log(theta)
        )

    low, high = correction_dim(s.beta_fast), correction_dim(s.beta_slow)
    if s.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, head_dim - 1)
    if low == high:
        high += 0.001  # avoid dividing by zero, as transformers does

    pos_freqs = _theta_powers(head_dim, theta)
    extrapolation = np.float32(1.0) / pos_freqs
    interpolation = np.float32(1.0) / (np.float32(s.factor) * pos_freqs)
    ramp = np.clip(
        (np.arange(head_dim // 2, dtype=np.float32) - np.float32(low)) / np.float32(high - low), 0, 1
    )
    keep = np.float32(1.0) - ramp.astype(np.float32)  # 1 = keep the original frequency
    return (interpolation * (np.float32(1.0) - keep) + extrapolation * keep).astype(np.float32)


def rope_parameters(config: Qwen3Config) -> tuple[np.ndarray, float]:
    """(inv_freq [head_dim // 2], attention_factor) for a config: plain RoPE, or YaRN when rope_scaling says so."""
    if config.rope_scaling is None:
        return default_inv_freq(config.head_dim, config.rope_theta), 1.0
    s = config.rope_scaling
    return yarn_inv_freq(config.head_dim, config.rope_theta, s), yarn_attention_factor(s)


def rope_cos_sin(
    positions: np.ndarray, inv_freq: np.ndarray, attention_factor: float = 1.0
) -> tuple[np.ndarray, np.ndarray]:  # [..., T], [d/2] -> [..., T, d], [..., T, d]
    # float32 angles, as transformers: at long positions float64 would drift from the reference by ~1e-3 rad
    angles = positions.astype(np.float32)[..., None] * inv_freq  # [..., T, d/2]
    angles = np.concatenate([angles, angles], axis=-1)  # split-half layout: both halves share the frequencies
    return np.cos(angles) * np.float32(attention_factor), np.sin(angles) * np.float32(attention_factor)


def rotate_half(x: np.ndarray) -> np.ndarray:  # [..., d] -> [..., d]
    half = x.shape[-1] // 2
    return np.concatenate([-x[..., half:], x[..., :half]], axis=-1)


def apply_rope(x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    # [B, heads, T, d], [B, T, d], [B, T, d] -> [B, heads, T, d]; the same angles for every head
    return x * cos[:, None] + rotate_half(x) * sin[:, None]


def apply_rope_backward(dy: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    # [B, heads, T, d], [B, T, d] x2 -> dx [B, heads, T, d]
    """dL/dx of `apply_rope`: the rotation's transpose, i.e. the rotation by the opposite angle.

    y = x·cos + R(x)·sin with R = rotate_half, a fixed linear map with Rᵀ = −R (a quarter turn of each pair).
    So dx = dy·cos + Rᵀ(dy·sin) = dy·cos − rotate_half(dy·sin). No parameters: RoPE has nothing to learn.

    >>> import numpy as np
    >>> c, s = np.cos(np.full((1, 1, 2), 0.3)), np.sin(np.full((1, 1, 2), 0.3))
    >>> x = np.array([[[[1.0, 2.0]]]]); bool(np.allclose(apply_rope_backward(apply_rope(x, c, s), c, s), x))
    True
    """
    dy_sin = dy * sin[:, None]
    return dy * cos[:, None] - rotate_half(dy_sin)
