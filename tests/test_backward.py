"""Every backward pass against central finite differences, in float64 on small shapes.

The check: for a random "upstream gradient" r, the scalar L(x) = Σ r ⊙ f(x) has dL/dx = backward(r). Each entry of
the analytic gradient is compared with (L(x + h·e_i) − L(x − h·e_i)) / 2h, h = 1e-6. In float64 the central
difference is accurate to ~h² · |f'''| + ε·|L|/h ≈ 1e-10 for these sizes, so the tolerance is

    |analytic − numeric| ≤ 1e-7 + 1e-6 · |numeric|    (FD_ATOL, FD_RTOL)

A wrong formula (a missing term, a transposed weight, a wrong group sum) is off by O(1) of the gradient: 1e-2 or
more. Measured worst error over these tests: ~3e-9. The whole model is checked the same way, on a sample of entries
of every parameter of two fixture configurations (dense tied; MoE with dense and sparse layers, norm_topk_prob
off and on) with the aux loss switched on, in both aux-loss scopes (transformers' pooled "global", and
"layer": per MoE layer, averaged).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import tinyqwen
from tinyqwen import attention as att
from tinyqwen import grad, mlp, moe, norm, rope

FD_ATOL, FD_RTOL, H = 1e-7, 1e-6, 1e-6
FIXTURES = Path(__file__).resolve().parent / "fixtures"


def numeric_grad(f, x: np.ndarray, idx=None) -> np.ndarray:
    """Central differences of the scalar f() with respect to x (in place), at every entry or at `idx` only."""
    out = np.zeros_like(x)
    for i in np.ndindex(x.shape) if idx is None else idx:
        old = x[i]
        x[i] = old + H
        plus = f()
        x[i] = old - H
        minus = f()
        x[i] = old
        out[i] = (plus - minus) / (2 * H)
    return out


def assert_grad(analytic, numeric, what=""):
    err = np.abs(analytic - numeric)
    bound = FD_ATOL + FD_RTOL * np.abs(numeric)
    assert (err <= bound).all(), (
        f"{what}: max |analytic − numeric| = {err.max():.3e} (bound {bound.max():.1e})"
    )
    assert np.abs(numeric).max() > 1e-3, f"{what}: the gradient is ~0, the check would prove nothing"


def rng(seed=0):
    return np.random.default_rng(seed)


def test_rms_norm_backward():
    g = rng()
    x, w, r = g.normal(size=(2, 3, 5)), 1 + 0.3 * g.normal(size=5), g.normal(size=(2, 3, 5))
    dx, dw = norm.rms_norm_backward(r, x, w, 1e-6)
    assert norm.rms_norm(x, w, 1e-6).dtype == np.float64  # the checks below really run in float64
    loss = lambda: float(np.sum(r * norm.rms_norm(x, w, 1e-6)))  # noqa: E731
    assert_grad(dx, numeric_grad(loss, x), "dx")
    assert_grad(dw, numeric_grad(loss, w), "dweight")


def test_qk_norm_backward_over_head_dim():
    g = rng(1)
    x, w, r = g.normal(size=(2, 3, 4, 6)), 1 + 0.3 * g.normal(size=6), g.normal(size=(2, 3, 4, 6))
    dx, dw = norm.rms_norm_backward(r, x, w, 1e-6)
    loss = lambda: float(np.sum(r * norm.rms_norm(x, w, 1e-6)))  # noqa: E731
    assert_grad(dx, numeric_grad(loss, x), "dx")
    assert_grad(dw, numeric_grad(loss, w), "dweight")


def test_rope_backward_is_the_transpose():
    g = rng(2)
    x, r = g.normal(size=(2, 3, 5, 8)), g.normal(size=(2, 3, 5, 8))
    cos, sin = rope.rope_cos_sin(g.integers(0, 50, size=(2, 5)), rope.default_inv_freq(8, 10000.0))
    cos, sin = cos.astype(np.float64), sin.astype(np.float64)
    loss = lambda: float(np.sum(r * rope.apply_rope(x, cos, sin)))  # noqa: E731
    assert_grad(rope.apply_rope_backward(r, cos, sin), numeric_grad(loss, x), "dx")


def test_softmax_backward():
    g = rng(3)
    x, r = g.normal(size=(3, 7)), g.normal(size=(3, 7))
    loss = lambda: float(np.sum(r * att.softmax(x)))  # noqa: E731
    assert_grad(att.softmax_backward(r, att.softmax(x)), numeric_grad(loss, x), "dx")


@pytest.mark.parametrize("hq,hkv", [(4, 2), (2, 2), (4, 1)])
def test_attention_backward_causal_gqa(hq, hkv):
    g = rng(4)
    B, T, d = 2, 5, 4
    q, k, v = g.normal(size=(B, hq, T, d)), g.normal(size=(B, hkv, T, d)), g.normal(size=(B, hkv, T, d))
    mask = np.broadcast_to(att.causal_mask(T, T), (B, T, T)).copy()
    mask[1, :, 0] = False  # a padded first key in the second row: masked keys must get no gradient
    mask[1, 0, 0] = True  # (keep one key per query row)
    r = g.normal(size=(B, hq, T, d))
    loss = lambda: float(np.sum(r * att.attention(q, k, v, mask)))  # noqa: E731
    dq, dk, dv = att.attention_backward(r, q, k, v, mask)
    assert_grad(dq, numeric_grad(loss, q), "dq")
    assert_grad(dk, numeric_grad(loss, k), "dk")
    assert_grad(dv, numeric_grad(loss, v), "dv")


def test_linear_silu_swiglu_backward():
    g = rng(5)
    x, wg, wu, wd = (
        g.normal(size=(2, 3, 4)),
        g.normal(size=(6, 4)),
        g.normal(size=(6, 4)),
        g.normal(size=(4, 6)),
    )
    r = g.normal(size=(2, 3, 4))
    z = 3 * g.normal(size=(5,))
    assert_grad(mlp.silu_backward(np.ones(5), z), numeric_grad(lambda: float(np.sum(mlp.silu(z))), z), "silu")
    dx, dw = mlp.linear_backward(r[..., :3], x, wg[:3])
    loss = lambda: float(np.sum(r[..., :3] * mlp.linear(x, wg[:3])))  # noqa: E731
    assert_grad(dx, numeric_grad(loss, x), "linear dx")
    loss = lambda: float(np.sum(r * mlp.swiglu(x, wg, wu, wd)))  # noqa: E731
    grads = mlp.swiglu_backward(r, x, wg, wu, wd)
    for name, a, d in zip(("x", "w_gate", "w_up", "w_down"), (x, wg, wu, wd), grads, strict=True):
        assert_grad(d, numeric_grad(loss, a), name)


@pytest.mark.parametrize("norm_topk_prob", [True, False])
def test_moe_block_backward(norm_topk_prob):
    g = rng(6)
    N, d, E, f, k = 10, 4, 5, 3, 2
    x, wr = g.normal(size=(N, d)), g.normal(size=(E, d))
    wg, wu, wd = g.normal(size=(E, f, d)), g.normal(size=(E, f, d)), g.normal(size=(E, d, f))
    r, rl = g.normal(size=(N, d)), g.normal(size=(N, E))  # upstream grads of the output and the router logits

    def loss():
        out, logits = moe.moe_block(x, wr, wg, wu, wd, k, norm_topk_prob)
        return float(np.sum(r * out) + np.sum(rl * logits))

    grads = moe.moe_block_backward(r, x, wr, wg, wu, wd, k, norm_topk_prob, drouter_logits=rl)
    # the top-k choice must not flip under ±h (it would make the loss jump): the draw has clear gaps
    probs = att.softmax(x @ wr.T)
    s = np.sort(probs, axis=-1)
    assert (s[:, -k] - s[:, -k - 1]).min() > 1e-4
    for name, a, dgrad in zip(("x", "router", "gate", "up", "down"), (x, wr, wg, wu, wd), grads, strict=True):
        assert_grad(dgrad, numeric_grad(loss, a), name)
    # an expert no token chose gets exactly zero gradient
    _, chosen = moe.route(x @ wr.T, k, norm_topk_prob)
    for e in set(range(E)) - set(chosen.ravel().tolist()):
        assert not grads[2][e].any()


@pytest.mark.parametrize("scope", ["global", "layer"])
def test_load_balancing_loss_backward(scope):
    g = rng(7)
    logits = [g.normal(size=(6, 4)), g.normal(size=(4, 4)), g.normal(size=(5, 4))]
    d = moe.load_balancing_loss_backward(logits, num_experts=4, top_k=2, scope=scope)
    for layer in range(3):
        num = numeric_grad(lambda: moe.load_balancing_loss(logits, 4, 2, scope), logits[layer])
        assert_grad(d[layer], num, f"{scope} layer {layer}")


def test_global_aux_loss_is_transformers_pooled_formula():
    # "global" (the default) is unchanged: transformers' load_balancing_loss_func written out by hand — concatenate
    # every layer's rows, f_e = top-k picks of e / rows, P_e = mean softmax, E · Σ f_e P_e. "layer" differs from it
    # when layers disagree, and equals it for a single layer.
    g = rng(17)
    logits = [g.normal(size=(6, 4)) + [2.0, 0, 0, 0], g.normal(size=(6, 4)) + [0, 0, 0, 2.0]]
    rows = np.concatenate(logits)
    p = np.exp(rows) / np.exp(rows).sum(axis=1, keepdims=True)
    top2 = np.argsort(-p, axis=1)[:, :2]
    f = np.array([(top2 == e).sum() for e in range(4)]) / len(rows)
    want = 4 * np.sum(f * p.mean(axis=0))
    assert moe.load_balancing_loss(logits, 4, 2) == pytest.approx(want, rel=1e-12)
    assert moe.load_balancing_loss(logits, 4, 2, "global") == pytest.approx(want, rel=1e-12)
    per_layer = moe.load_balancing_loss(logits, 4, 2, "layer")
    assert per_layer > want + 0.1  # each layer is more uneven than the two pooled
    assert moe.load_balancing_loss(logits[:1], 4, 2, "layer") == moe.load_balancing_loss(logits[:1], 4, 2)
    with pytest.raises(tinyqwen.errors.ConfigError, match="scope"):
        moe.load_balancing_loss(logits, 4, 2, "expert")


def test_cross_entropy_and_embedding_backward():
    g = rng(8)
    logits, targets = g.normal(size=(5, 7)), np.array([1, 6, grad.IGNORE, 0, 3])
    d = grad.cross_entropy_backward(logits, targets)
    assert_grad(d, numeric_grad(lambda: grad.cross_entropy(logits, targets), logits), "dlogits")
    assert not d[2].any()
    table, ids, r = g.normal(size=(6, 3)), np.array([[1, 4, 1], [0, 1, 5]]), g.normal(size=(2, 3, 3))
    num = numeric_grad(lambda: float(np.sum(r * table[ids])), table)
    assert_grad(grad.embedding_backward(r, ids, 6), num, "dtable")


@pytest.mark.parametrize(
    "fixture,norm_topk,scope",
    [
        ("dense-tied", None, "global"),
        ("moe-sparse-step", False, "global"),
        ("moe-norm-topk", True, "global"),
        ("moe-norm-topk", True, "layer"),
    ],
)
def test_whole_model_gradient(fixture, norm_topk, scope):
    model = tinyqwen.load_model(FIXTURES / fixture)
    c = model.config
    if norm_topk is not None:
        assert c.norm_topk_prob == norm_topk
    w = grad.copy_weights(model.weights, np.float64)
    ids = rng(9).integers(0, c.vocab_size, size=(2, 6))

    def loss():
        return grad.loss_and_grads(c, w, ids, aux_coef=0.5, aux_scope=scope).loss

    result = grad.loss_and_grads(c, w, ids, aux_coef=0.5, aux_scope=scope)
    params, grads = grad.named_parameters(w), grad.named_parameters(result.grads)
    pick = rng(10)
    for name, a in params.items():
        idx = [tuple(int(pick.integers(0, s)) for s in a.shape) for _ in range(4)]
        if name == "model.embed_tokens.weight":  # rows of tokens that occur, else the gradient is 0
            idx = [(int(ids[0, j]), int(pick.integers(0, a.shape[1]))) for j in range(4)]
        if ".experts." in name:  # an expert that got tokens
            e = int(np.flatnonzero(grads[name].reshape(a.shape[0], -1).any(axis=1))[0])
            idx = [(e,) + i[1:] for i in idx]
        num = numeric_grad(loss, a, idx)
        got = np.array([grads[name][i] for i in idx])
        want = np.array([num[i] for i in idx])
        err = np.abs(got - want)
        assert (err <= FD_ATOL + FD_RTOL * np.abs(want)).all(), f"{fixture} {name}: max error {err.max():.2e}"
    assert result.loss == pytest.approx(result.ce + 0.5 * result.aux)


def test_without_qk_norm():
    """The ablation switch `qk_norm: false` (chapter 14): the inference model and the trainer's forward skip QK-Norm
    alike, the q_norm / k_norm weights get no gradient, and the rest of the gradient still matches finite
    differences."""
    import dataclasses

    model = tinyqwen.load_model(FIXTURES / "dense-tied")
    c = dataclasses.replace(model.config, qk_norm=False)
    ids = rng(11).integers(0, c.vocab_size, size=(2, 6))
    with_norm = model(ids)
    model.config = c
    without = model(ids)
    assert np.abs(with_norm - without).max() > 1e-3, "switching QK-Norm off changed nothing"
    w = grad.copy_weights(model.weights, np.float64)
    result = grad.loss_and_grads(c, w, ids, keep_logits=True)
    assert np.abs(result.logits - without).max() < 1e-4  # float64 trainer vs float32 model: the same function
    params, grads = grad.named_parameters(w), grad.named_parameters(result.grads)
    assert not grads["model.layers.0.self_attn.q_norm.weight"].any()
    assert not grads["model.layers.1.self_attn.k_norm.weight"].any()
    for name in ("model.layers.0.self_attn.q_proj.weight", "model.layers.1.self_attn.k_proj.weight"):
        idx = [(i, 2 * i + 1) for i in range(4)]
        num = numeric_grad(lambda: grad.loss_and_grads(c, w, ids).loss, params[name], idx)
        assert_grad(np.array([grads[name][i] for i in idx]), np.array([num[i] for i in idx]), name)
