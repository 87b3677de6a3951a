"""Chapter 4 exercises: rotary position embeddings (RoPE) and YaRN.

Work through notebooks/04-rope-yarn.ipynb, then fill in each function below, in order, and grade them with

    pytest exercises/test_ch04_rope_yarn.py

Everything is NumPy in float32 (transformers computes RoPE in float32, and so must you to match it at long positions).
The head layout is Qwen3's: `x` is [batch, heads, T, head_dim] and channel j is paired with channel j + head_dim/2
("split-half"), not with its neighbour j + 1.
"""

from __future__ import annotations

import numpy as np


def rope_inv_freq(head_dim: int, theta: float) -> np.ndarray:  # -> [head_dim // 2] float32
    """The rotation speed of each channel pair: inv_freq[i] = 1 / theta ** (2i / head_dim), i = 0 .. head_dim/2 - 1.

    Pair 0 turns 1 radian per position; the last pair turns almost theta times slower. Return float32 (the
    notebook's section "Float32 angles" shows why its last bit matters at long positions).

    >>> rope_inv_freq(4, 10000.0)
    array([1.  , 0.01], dtype=float32)
    >>> rope_inv_freq(8, 10000.0)
    array([1.   , 0.1  , 0.01 , 0.001], dtype=float32)
    """
    raise NotImplementedError


def rope_cos_sin(
    positions: np.ndarray, inv_freq: np.ndarray, attention_factor: float = 1.0
) -> tuple[np.ndarray, np.ndarray]:  # [..., T] ints, [d/2] -> cos [..., T, d], sin [..., T, d] float32
    """The cos and sin tables: angle[..., t, i] = positions[..., t] · inv_freq[i], in float32.

    Both halves of the last axis hold the same angles (split-half layout: pair i is channels i and i + d/2), and
    both tables are multiplied by `attention_factor` (1 for plain RoPE; YaRN's factor otherwise). Positions are
    the tokens' indices and start at 0.

    >>> cos, sin = rope_cos_sin(np.array([[0, 1]]), np.array([1.0, 0.01], dtype=np.float32))
    >>> cos.shape, cos.dtype
    ((1, 2, 4), dtype('float32'))
    >>> cos.round(4)
    array([[[1.    , 1.    , 1.    , 1.    ],
            [0.5403, 1.    , 0.5403, 1.    ]]], dtype=float32)
    >>> sin.round(4)
    array([[[0.    , 0.    , 0.    , 0.    ],
            [0.8415, 0.01  , 0.8415, 0.01  ]]], dtype=float32)
    """
    raise NotImplementedError


def rotate_half(x: np.ndarray) -> np.ndarray:  # [..., d] -> [..., d]
    """Turn every split-half pair (x[i], x[i + d/2]) by 90°: it becomes (-x[i + d/2], x[i]).

    >>> rotate_half(np.array([1.0, 2.0, 3.0, 4.0]))
    array([-3., -4.,  1.,  2.])
    """
    raise NotImplementedError


def apply_rope(x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    """Rotate queries or keys: x · cos + rotate_half(x) · sin, the same angles for every head.

    x [B, heads, T, d], cos and sin [B, T, d] (from rope_cos_sin) -> [B, heads, T, d].

    Pair 0 of a vector (1, 0) at position 1 turns by 1 radian to (cos 1, sin 1):

    >>> cos, sin = rope_cos_sin(np.array([[1]]), np.array([1.0, 0.01], dtype=np.float32))
    >>> x = np.array([1.0, 0.0, 0.0, 0.0], dtype=np.float32).reshape(1, 1, 1, 4)
    >>> apply_rope(x, cos, sin).round(4)
    array([[[[0.5403, 0.    , 0.8415, 0.    ]]]], dtype=float32)
    """
    raise NotImplementedError


def yarn_inv_freq(
    head_dim: int,
    theta: float,
    factor: float,
    original_max_position_embeddings: int,
    beta_fast: float = 32.0,
    beta_slow: float = 1.0,
) -> np.ndarray:  # -> [head_dim // 2] float32
    """YaRN's frequencies: keep the fast pairs, divide the slow pairs by `factor`, blend linearly in between.

    1. The pair index whose wavelength fits r full turns into the original window L (a real number):
           dim(r) = head_dim · ln(L / (2π r)) / (2 ln theta)
    2. low = floor(dim(beta_fast)), high = ceil(dim(beta_slow)), clamped to [0, head_dim - 1]
       (if low == high, add 0.001 to high so the next line never divides by zero).
    3. ramp[i] = clip((i - low) / (high - low), 0, 1) for i = 0 .. head_dim/2 - 1:
       0 for fast pairs (many turns inside L: keep inv_freq), 1 for slow pairs (interpolate: inv_freq / factor).
    4. inv_freq_yarn = inv_freq · (1 - ramp) + (inv_freq / factor) · ramp, with inv_freq from rope_inv_freq.

    Here low = floor(-0.50) -> 0 and high = ceil(1.01) = 2, so ramp = [0, 0.5, 1, 1]: pair 0 keeps its frequency,
    pair 1 gets (1 - 0.5) + 0.5 / 4 = 0.625 of it, pairs 2 and 3 get 1/4:

    >>> yarn = yarn_inv_freq(8, 10000.0, factor=4.0, original_max_position_embeddings=64)
    >>> yarn.shape, yarn.dtype
    ((4,), dtype('float32'))
    >>> (yarn / rope_inv_freq(8, 10000.0)).round(4)
    array([1.   , 0.625, 0.25 , 0.25 ], dtype=float32)
    """
    raise NotImplementedError


def yarn_attention_factor(factor: float) -> float:
    """YaRN's scale for cos and sin (it sharpens the softmax): 0.1 · ln(factor) + 1, and 1.0 when factor <= 1.

    >>> round(yarn_attention_factor(4.0), 4)
    1.1386
    >>> yarn_attention_factor(1.0)
    1.0
    """
    raise NotImplementedError
