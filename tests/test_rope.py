"""RoPE and YaRN: hand-derived properties, and YaRN's inv_freq / attention factor against transformers' values."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from tinyqwen.config import CONFIG_DIR, RopeScaling, load_config
from tinyqwen.rope import (
    apply_rope,
    default_inv_freq,
    rope_cos_sin,
    rope_parameters,
    rotate_half,
    yarn_attention_factor,
    yarn_inv_freq,
)

FIXTURES = Path(__file__).parent / "fixtures"


def test_rotate_half_is_split_half():
    # pairs are (x0, x2) and (x1, x3), not neighbours
    np.testing.assert_array_equal(rotate_half(np.array([1.0, 2.0, 3.0, 4.0])), [-3.0, -4.0, 1.0, 2.0])


def test_default_inv_freq_by_hand():
    np.testing.assert_allclose(default_inv_freq(8, 10000.0), [1.0, 0.1, 0.01, 0.001], rtol=1e-6)


def test_rope_rotates_pairs_by_position_times_frequency():
    d = 4
    inv = default_inv_freq(d, 100.0)  # [1, 0.1]
    x = np.array([1.0, 0.0, 0.0, 1.0], dtype=np.float32)  # pair 0 = (1, 0), pair 1 = (0, 1)
    cos, sin = rope_cos_sin(np.array([[3]]), inv)
    y = apply_rope(x[None, None, None, :], cos, sin)[0, 0, 0]
    # pair 0 turned by 3 rad: (cos 3, sin 3); pair 1 = (0, 1) turned by 0.3 rad: (-sin 0.3, cos 0.3)
    np.testing.assert_allclose(
        y, [math.cos(3), -math.sin(0.3), math.sin(3), math.cos(0.3)], rtol=1e-5, atol=1e-6
    )


def test_rope_scores_depend_only_on_relative_position():
    rng = np.random.default_rng(0)
    q, k = rng.standard_normal((2, 1, 1, 1, 16)).astype(np.float32)
    inv = default_inv_freq(16, 10000.0)

    def score(pq, pk):
        cq, sq = rope_cos_sin(np.array([[pq]]), inv)
        ck, sk = rope_cos_sin(np.array([[pk]]), inv)
        return float((apply_rope(q, cq, sq) * apply_rope(k, ck, sk)).sum())

    assert score(7, 3) == pytest.approx(score(104, 100), rel=1e-4)
    assert score(7, 3) != pytest.approx(score(7, 4), rel=1e-3)


def test_yarn_by_hand():
    # head_dim 8, theta 10000, original window 64, factor 4: correction dims (beta 32, 1) are
    # low = 8·ln(64/(32·2π))/(2 ln 1e4) = -0.50 -> floor -1 -> clamp 0; high = 8·ln(64/2π)/(2 ln 1e4) = 1.01 -> ceil 2
    s = RopeScaling(factor=4.0, original_max_position_embeddings=64)
    inv = yarn_inv_freq(8, 10000.0, s)
    base = default_inv_freq(8, 10000.0)
    ramp = np.clip((np.arange(4) - 0) / (2 - 0), 0, 1)  # [0, .5, 1, 1]: 0 keeps, 1 interpolates
    np.testing.assert_allclose(inv, base * (1 - ramp) + base / 4 * ramp, rtol=1e-6)
    assert yarn_attention_factor(s) == pytest.approx(0.1 * math.log(4) + 1)


def _yarn_fixture():
    for ref in sorted(FIXTURES.glob("*/reference.npz")):
        if load_config(ref.parent).rope_scaling is not None:
            return ref.parent, np.load(ref)
    pytest.fail(f"no YaRN fixture in {FIXTURES}")


@pytest.mark.parametrize(
    "path", sorted(p.parent for p in FIXTURES.glob("*/reference.npz")), ids=lambda p: p.name
)
def test_inv_freq_matches_transformers(path):
    ref = np.load(path / "reference.npz")
    inv_freq, factor = rope_parameters(load_config(path))
    np.testing.assert_allclose(inv_freq, ref["inv_freq"], rtol=1e-6, atol=0)
    assert factor == pytest.approx(float(ref["attention_factor"]), rel=1e-7)


def test_yarn_matches_transformers():
    path, ref = _yarn_fixture()
    config = load_config(path)
    inv_freq, factor = rope_parameters(config)
    np.testing.assert_allclose(inv_freq, ref["inv_freq"], rtol=1e-6, atol=0)
    assert factor == pytest.approx(float(ref["attention_factor"]), rel=1e-7)
    # YaRN must actually change something here, or the test proves nothing
    assert not np.allclose(inv_freq, default_inv_freq(config.head_dim, config.rope_theta))
    assert factor != 1.0


def test_long_position_tables_match_transformers():
    """From config.json to the cos/sin tables at positions up to 40,959 (plain) and 131,071 (YaRN), end to end.

    The reference is transformers' Qwen3RotaryEmbedding on the real Qwen3-0.6B configs (exercises/references/,
    made by make_ch04_rope_yarn.py). One float32 ulp of a fast pair's inv_freq moves its angle by ~2e-3 rad at
    position 40,959, so this fails unless inv_freq is rounded the way torch rounds it.
    """
    ref = np.load(Path(__file__).parents[1] / "exercises" / "references" / "ch04_rope_yarn.npz")
    for case, config in (
        ("long", CONFIG_DIR / "Qwen3-0.6B.json"),
        ("yarn_long", FIXTURES / "configs" / "Qwen3-0.6B-yarn.json"),
    ):
        inv_freq, factor = rope_parameters(load_config(config))
        cos, sin = rope_cos_sin(ref[f"cos_sin.{case}.positions"], inv_freq, factor)
        np.testing.assert_allclose(cos, ref[f"cos_sin.{case}.cos"], atol=1e-5, rtol=0)
        np.testing.assert_allclose(sin, ref[f"cos_sin.{case}.sin"], atol=1e-5, rtol=0)
