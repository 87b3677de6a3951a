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
(= k) when routing is uniform; `load_balancing_loss` computes it over all MoE layers at once, as transformers does.
"""

from __future__ import annotations

import numpy as np

from tinyqwen.attention import softmax
from tinyqwen.mlp import linear, swiglu


def route(
    router_logits: np.ndarray, top_k: int, norm_topk_prob: bool
) -> tuple[np.ndarray, np.ndarray]:  # [N, E] -> weights [N, k] float32, experts [N, k] int
    """Softmax over all experts, keep the k largest, optionally renormalise them to sum to 1.

    >>> import numpy as np
    >>> w, idx = route(np.log(np.array([[0.1, 0.6, 0.3]], dtype=np.float32)), top_k=2, norm_topk_prob=True)
    >>> idx.tolist(), [round(float(v), 3) for v in w[0]]
    ([[1, 2]], [0.667, 0.333])
    """
    probs = softmax(router_logits.astype(np.float32))
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


def load_balancing_loss(router_logits: list[np.ndarray], num_experts: int, top_k: int) -> float:
    """The unscaled auxiliary loss E · Σ_e f_e · P_e over every MoE layer's router logits (transformers' aux_loss).

    `router_logits` holds one [tokens, num_experts] array per MoE layer; all layers' tokens are pooled.
    Uniform routing gives exactly top_k:

    >>> import numpy as np
    >>> round(load_balancing_loss([np.zeros((4, 4))], num_experts=4, top_k=2), 6)  # ties: f = [1,1,0,0]/2
    2.0
    """
    if len(router_logits) == 0:
        return 0.0
    logits = np.concatenate([np.asarray(r, dtype=np.float32).reshape(-1, num_experts) for r in router_logits])
    probs = softmax(logits)
    _, experts = route(logits, top_k, norm_topk_prob=False)
    n = logits.shape[0]
    tokens_per_expert = (
        np.bincount(experts.ravel(), minlength=num_experts) / n
    )  # f_e, summed over the k slots
    prob_per_expert = probs.mean(axis=0)  # P_e
    return float(num_experts * np.sum(tokens_per_expert * prob_per_expert))
