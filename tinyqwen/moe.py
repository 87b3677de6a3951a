"""Mixture of experts: a router sends each token to k of E small SwiGLU "experts".

Qwen3-30B-A3B has 128 experts per MoE layer and uses 8 per token, so only ~3B of its 30B parameters run per token.
For each token x:

    logits  = router(x)                         # [E]   one linear layer, no bias
    probs   = softmax(logits)                   # over ALL experts, before choosing
    w, idx  = top_k(probs, k)                   # the k most probable experts
    w       = w / sum(w)    if norm_topk_prob   # renormalise (Qwen3-MoE: true) — otherwise weights sum to < 1
    y       = Σ_j w[j] · expert[idx[j]](x)

Training adds the Switch-Transformer load-balancing loss, E · Σ_e f_e · P_e, where f_e is the fraction of
(token, slot) routing assignments that went to expert e and P_e the mean router probability of e. It is minimal
(= k) when routing is uniform. `load_balancing_loss` computes it as transformers does — over all MoE layers'
rows pooled together (scope "global") — or per layer and averaged (scope "layer", Switch / GShard style).
"""

from __future__ import annotations

import numpy as np

from tinyqwen.attention import softmax, softmax_backward
from tinyqwen.errors import ConfigError
from tinyqwen.mlp import linear, linear_backward, swiglu, swiglu_backward


def _float32_or_64(x: np.ndarray) -> np.ndarray:
    # routing runs in float32 (as transformers' softmax(dtype=float)); float64 stays float64 for gradient checks
    return x if x.dtype == np.float64 else x.astype(np.float32)


def route(
    router_logits: np.ndarray, top_k: int, norm_topk_prob: bool
) -> tuple[np.ndarray, np.ndarray]:  # [N, E] -> weights [N, k] float32, experts [N, k] int
    """Softmax over all experts, keep the k largest, optionally renormalise them to sum to 1.

    >>> import numpy as np
    >>> w, idx = route(np.log(np.array([[0.1, 0.6, 0.3]], dtype=np.float32)), top_k=2, norm_topk_prob=True)
    >>> idx.tolist(), [round(float(v), 3) for v in w[0]]
    ([[1, 2]], [0.667, 0.333])
    """
    probs = softmax(_float32_or_64(router_logits))
    # stable sort of the negated probabilities: the k largest, ties resolved towards the lower expert index
    experts = np.argsort(-probs, axis=-1, kind="stable")[:, :top_k]
    weights = np.take_along_axis(probs, experts, axis=-1)
    if norm_topk_prob:
        weights = weights / weights.sum(axis=-1, keepdims=True)
    return weights, experts


def moe_block(
    x: np.ndarray,  # [N, d] tokens (batch and time flattened)
    w_router: np.ndarray,  # [E, d]
    w_gate: np.ndarray,  # [E, f, d]
    w_up: np.ndarray,  # [E, f, d]
    w_down: np.ndarray,  # [E, d, f]
    top_k: int,
    norm_topk_prob: bool,
) -> tuple[np.ndarray, np.ndarray]:  # -> output [N, d], router logits [N, E]
    router_logits = linear(x, w_router)
    weights, experts = route(router_logits, top_k, norm_topk_prob)
    out = np.zeros_like(x)
    # loop over experts, not tokens: each expert runs once on the (few) tokens that chose it
    for e in np.unique(experts):
        token, slot = np.nonzero(experts == e)
        y = swiglu(x[token], w_gate[e], w_up[e], w_down[e]) * weights[token, slot, None]
        np.add.at(out, token, y)  # a token never picks the same expert twice, but add.at is safe regardless
    return out, router_logits


AUX_LOSS_SCOPES = ("global", "layer")


def _aux_terms(logits: np.ndarray, num_experts: int, top_k: int) -> tuple[np.ndarray, np.ndarray]:
    # [N, E] -> f [E] (share of the N·k (token, slot) picks, times k; no gradient), probs [N, E]
    probs = softmax(logits)
    _, experts = route(logits, top_k, norm_topk_prob=False)
    f = np.bincount(experts.ravel(), minlength=num_experts) / logits.shape[0]  # f_e, summed over the k slots
    return f, probs


def _check_scope(scope: str) -> None:
    if scope not in AUX_LOSS_SCOPES:
        raise ConfigError(f"aux loss scope must be one of {AUX_LOSS_SCOPES}, got {scope!r}")


def load_balancing_loss(
    router_logits: list[np.ndarray], num_experts: int, top_k: int, scope: str = "global"
) -> float:
    """The unscaled auxiliary loss E · Σ_e f_e · P_e over every MoE layer's router logits.

    `router_logits` holds one [tokens, num_experts] array per MoE layer. Two scopes:

    - "global" (transformers' aux_loss, the default): all layers' rows are pooled into one [L·N, E] array before
      f_e and P_e are taken, so the loss balances each expert index *summed over layers* — it cannot see that
      expert 3 is starved in layer 0 if it is overloaded in layer 2.
    - "layer" (Switch Transformer / GShard style): the loss of each layer's own f_e, P_e, then the mean over
      layers. The mean (not the sum) keeps the value at uniform routing equal to top_k and the gradient per router
      row the same size as "global" (both divide by L·N), so a coefficient means the same strength in both.

    Uniform routing gives exactly top_k:

    >>> import numpy as np
    >>> round(load_balancing_loss([np.zeros((4, 4))], num_experts=4, top_k=2), 6)  # ties: f = [1,1,0,0]/2
    2.0
    >>> a, b = np.log([[0.7, 0.3]] * 2), np.log([[0.3, 0.7]] * 2)  # layer 0 favours expert 0, layer 1 expert 1
    >>> round(load_balancing_loss([a, b], 2, 1), 6), round(load_balancing_loss([a, b], 2, 1, scope="layer"), 6)
    (1.0, 1.4)
    """
    _check_scope(scope)
    if len(router_logits) == 0:
        return 0.0
    flat = [_float32_or_64(np.asarray(r)).reshape(-1, num_experts) for r in router_logits]
    groups = [np.concatenate(flat)] if scope == "global" else flat
    losses = []
    for logits in groups:
        f, probs = _aux_terms(logits, num_experts, top_k)
        losses.append(num_experts * np.sum(f * probs.mean(axis=0)))  # E · Σ_e f_e · P_e
    return float(np.mean(losses))


def expert_shares(counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    # [L, E] (token, slot) picks per MoE layer -> per layer [L, E], pooled over layers [E]; 1 = uniform
    """Each expert's share of the routing picks as a multiple of uniform (1/E): per layer, and pooled over layers
    (what the "global" aux loss balances: the counts of expert e summed over every layer).

    >>> per_layer, pooled = expert_shares(np.array([[30, 10], [10, 30]]))
    >>> per_layer.tolist(), pooled.tolist()
    ([[1.5, 0.5], [0.5, 1.5]], [1.0, 1.0])
    """
    counts = np.asarray(counts, dtype=np.float64)
    E = counts.shape[-1]
    per_layer = counts / counts.sum(axis=-1, keepdims=True) * E
    pooled = counts.sum(axis=0) / counts.sum() * E
    return per_layer, pooled


def route_backward(
    dweights: np.ndarray, router_logits: np.ndarray, experts: np.ndarray, norm_topk_prob: bool
) -> np.ndarray:  # [N, k], [N, E], [N, k] -> d router_logits [N, E]
    """Back through `route`: the top-k *choice* is a hard selection with no gradient ("straight through" for the
    chosen experts only); the chosen *weights* are differentiable functions of all E router logits.

    w_j = p_j / S (S = Σ_selected p) when renormalising, so dp_j = (dw_j − Σ_i dw_i·w_i) / S on the selected
    experts and 0 elsewhere; then softmax_backward spreads that over every logit (the unchosen ones too, because
    their logits appear in the softmax's denominator).
    """
    probs = softmax(router_logits)
    chosen = np.take_along_axis(probs, experts, axis=-1)  # [N, k]
    if norm_topk_prob:
        total = chosen.sum(axis=-1, keepdims=True)
        weights = chosen / total
        dchosen = (dweights - np.sum(dweights * weights, axis=-1, keepdims=True)) / total
    else:
        dchosen = dweights
    dprobs = np.zeros_like(probs)
    np.put_along_axis(dprobs, experts, dchosen, axis=-1)
    return softmax_backward(dprobs, probs)


def moe_block_backward(
    dout: np.ndarray,  # [N, d] dL/d output
    x: np.ndarray,  # [N, d] the block's input
    w_router: np.ndarray,  # [E, d]
    w_gate: np.ndarray,  # [E, f, d]
    w_up: np.ndarray,  # [E, f, d]
    w_down: np.ndarray,  # [E, d, f]
    top_k: int,
    norm_topk_prob: bool,
    drouter_logits: np.ndarray | None = None,  # [N, E] extra gradient on the router logits (the aux loss's)
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    # -> dx [N, d], dw_router [E, d], dw_gate [E, f, d], dw_up [E, f, d], dw_down [E, d, f]
    """Gradients of `moe_block`, exactly as autograd sees it: each expert's weights get gradient only from the
    tokens routed to it (an unchosen expert gets exactly zero), and the router learns through the *weights* of
    the chosen experts — dL/dw_j = dout · expert_j(x) — and through the aux loss when `drouter_logits` is given.
    """
    router_logits = linear(x, w_router)
    weights, experts = route(router_logits, top_k, norm_topk_prob)
    weights = weights.astype(x.dtype, copy=False)
    dx = np.zeros_like(x)
    dweights = np.zeros(weights.shape, dtype=x.dtype)
    dw_gate, dw_up, dw_down = np.zeros_like(w_gate), np.zeros_like(w_up), np.zeros_like(w_down)
    for e in np.unique(experts):
        token, slot = np.nonzero(experts == e)
        xe = x[token]
        y = swiglu(xe, w_gate[e], w_up[e], w_down[e])  # [n_e, d] the expert's output before weighting
        dweights[token, slot] = np.sum(dout[token] * y, axis=-1)
        dxe, dw_gate[e], dw_up[e], dw_down[e] = swiglu_backward(
            dout[token] * weights[token, slot, None], xe, w_gate[e], w_up[e], w_down[e]
        )
        np.add.at(dx, token, dxe)
    dlogits = route_backward(dweights, router_logits, experts, norm_topk_prob).astype(x.dtype, copy=False)
    if drouter_logits is not None:
        dlogits = dlogits + drouter_logits
    dx_router, dw_router = linear_backward(dlogits, x, w_router)
    return dx + dx_router, dw_router, dw_gate, dw_up, dw_down


def load_balancing_loss_backward(
    router_logits: list[np.ndarray], num_experts: int, top_k: int, scope: str = "global"
) -> list[np.ndarray]:
    """d(load_balancing_loss)/d(router logits), one [tokens, E] array per MoE layer (same order and shapes).

    aux = E · Σ_e f_e · P_e. The counts f_e come from a top-k *choice* and carry no gradient (as in transformers),
    so only P_e = mean over the rows of softmax(logits)[:, e] is differentiated: d aux / d probs[n, e] = E · f_e / M
    with M the number of rows averaged — all L·N pooled rows for scope "global", the layer's own N rows for
    "layer" (then × 1/L for the mean over layers). An expert that already gets many tokens has its probability
    pushed down hardest; with "global" that push uses the expert's load summed over layers, so it is the same in
    every layer, whatever that layer's own load is.

    >>> g = load_balancing_loss_backward([np.zeros((2, 2))], num_experts=2, top_k=1)[0]  # ties: both pick 0
    >>> g.tolist()
    [[0.25, -0.25], [0.25, -0.25]]
    """
    _check_scope(scope)
    if len(router_logits) == 0:
        return []
    flat = [np.asarray(r).reshape(-1, num_experts) for r in router_logits]
    if scope == "layer":
        out = []
        for logits in flat:
            f, probs = _aux_terms(logits, num_experts, top_k)
            d = np.broadcast_to(num_experts * f / (logits.shape[0] * len(flat)), probs.shape)
            out.append(softmax_backward(d, probs).astype(logits.dtype))
        return out
    logits = np.concatenate(flat)
    f, probs = _aux_terms(logits, num_experts, top_k)
    n = logits.shape[0]
    dlogits = softmax_backward(np.broadcast_to(num_experts * f / n, probs.shape), probs).astype(logits.dtype)
    return np.split(dlogits, np.cumsum([a.shape[0] for a in flat])[:-1])
