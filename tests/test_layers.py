"""The building blocks on their own, against hand-derived values and naive re-statements of their definitions."""

from __future__ import annotations

import doctest
import importlib
import pkgutil

import numpy as np
import pytest

import tinyqwen
from tinyqwen.attention import attention, causal_mask, softmax
from tinyqwen.mlp import silu, swiglu
from tinyqwen.moe import load_balancing_loss, moe_block, route
from tinyqwen.norm import rms_norm

rng = np.random.default_rng(0)


def _modules():
    """tinyqwen's modules, and those of its subpackages (tinyqwen.serve) but not the backends (tests of their own)."""
    names = []
    for m in pkgutil.iter_modules(tinyqwen.__path__, "tinyqwen."):
        names.append(m.name)
        if m.ispkg and m.name != "tinyqwen.backends":
            package = importlib.import_module(m.name)
            names += [s.name for s in pkgutil.iter_modules(package.__path__, m.name + ".")]
    return names


@pytest.mark.parametrize("name", _modules())
def test_docstring_examples(name):
    """The worked examples in the chapters' docstrings are tests too."""
    result = doctest.testmod(importlib.import_module(name), optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0


def test_rms_norm_by_hand():
    x = np.array([[1.0, -1.0, 1.0, -1.0], [2.0, 0.0, 0.0, 0.0]], dtype=np.float32)
    w = np.array([1.0, 2.0, 3.0, 4.0], dtype=np.float32)
    # rms of row 0 is 1; rms of row 1 is sqrt(4/4) = 1
    np.testing.assert_allclose(rms_norm(x, w, eps=0.0), [[1, -2, 3, -4], [2, 0, 0, 0]], rtol=1e-6)
    assert rms_norm(x.astype(np.float16), w, 1e-6).dtype == np.float32  # computed in float32


def test_silu_extremes_do_not_warn():
    with np.errstate(all="raise"):
        np.testing.assert_allclose(silu(np.array([-1000.0, 0.0, 1000.0], dtype=np.float32)), [0, 0, 1000])


def test_swiglu_definition():
    x = rng.standard_normal((3, 8)).astype(np.float32)
    g, u, d = (rng.standard_normal(s).astype(np.float32) for s in ((5, 8), (5, 8), (8, 5)))
    a = x @ g.T
    np.testing.assert_allclose(swiglu(x, g, u, d), ((a / (1 + np.exp(-a))) * (x @ u.T)) @ d.T, rtol=1e-5)


def test_gqa_attention_equals_repeated_kv_heads_naive_loop():
    B, Hq, Hkv, T, S, d = 2, 6, 2, 3, 5, 4
    q = rng.standard_normal((B, Hq, T, d)).astype(np.float32)
    k, v = rng.standard_normal((2, B, Hkv, S, d)).astype(np.float32)
    mask = np.broadcast_to(causal_mask(T, S), (B, T, S)).copy()
    mask[1, :, 0] = False  # a padding key in row 1
    out = attention(q, k, v, mask)
    for b in range(B):
        for h in range(Hq):
            kv = h // (Hq // Hkv)  # query head h reads kv head h // group
            s = q[b, h] @ k[b, kv].T / np.sqrt(d)
            s[~mask[b]] = -np.inf
            np.testing.assert_allclose(out[b, h], softmax(s) @ v[b, kv], rtol=1e-5, atol=1e-6)


def test_fully_masked_row_gives_no_nan():
    q = np.ones((1, 1, 1, 2), np.float32)
    out = attention(q, q, q, np.zeros((1, 1, 1), bool))
    assert np.isfinite(out).all()


def test_route_top_k_and_renormalisation_by_hand():
    probs = np.array([[0.1, 0.5, 0.15, 0.25]], dtype=np.float32)
    w, idx = route(np.log(probs), top_k=2, norm_topk_prob=False)
    assert idx.tolist() == [[1, 3]]
    np.testing.assert_allclose(w, [[0.5, 0.25]], rtol=1e-6)  # not renormalised: sums to 0.75
    w, _ = route(np.log(probs), top_k=2, norm_topk_prob=True)
    np.testing.assert_allclose(w, [[2 / 3, 1 / 3]], rtol=1e-6)


def test_moe_block_equals_per_token_loop():
    N, d, f, E, k = 7, 8, 4, 5, 2
    x = rng.standard_normal((N, d)).astype(np.float32)
    wr = rng.standard_normal((E, d)).astype(np.float32)
    wg, wu = rng.standard_normal((2, E, f, d)).astype(np.float32)
    wd = rng.standard_normal((E, d, f)).astype(np.float32)
    out, logits = moe_block(x, wr, wg, wu, wd, k, norm_topk_prob=True)
    for n in range(N):
        p = np.exp(logits[n] - logits[n].max())
        p /= p.sum()
        top = np.argsort(-p)[:k]
        want = sum(p[e] / p[top].sum() * swiglu(x[n], wg[e], wu[e], wd[e]) for e in top)
        np.testing.assert_allclose(out[n], want, rtol=1e-5, atol=1e-5)


def test_load_balancing_loss_by_hand():
    # 2 tokens, 2 experts, top-1. token 0 -> expert 0 with p = [0.75, 0.25]; token 1 -> expert 0 with p = [0.5+, 0.5-]
    logits = [np.log(np.array([[0.75, 0.25], [0.6, 0.4]], dtype=np.float32))]
    # f = [1, 0], P = [0.675, 0.325] -> E · Σ f·P = 2 · 0.675
    assert load_balancing_loss(logits, num_experts=2, top_k=1) == pytest.approx(1.35, rel=1e-6)
    # layers are pooled: two copies of the same layer give the same value
    assert load_balancing_loss(logits * 2, num_experts=2, top_k=1) == pytest.approx(1.35, rel=1e-6)
    assert load_balancing_loss([], 2, 1) == 0.0
