"""Chapter 7 — Mixture of experts: your implementation.

Work through notebooks/07-mixture-of-experts.ipynb, then fill in the functions below in order (each replaces a
`raise NotImplementedError`) and grade them with

    pytest exercises/test_ch07_mixture_of_experts.py

`softmax` (chapter 5) and `linear` / `swiglu` (chapter 6) are imported from tinyqwen so this chapter stands on its
own; swap in your own versions if you like. The last checkpoint runs YOUR moe_block (and your kernels of chapters
3-6) inside the two MoE fixture models.
"""

from __future__ import annotations

import numpy as np

from tinyqwen.attention import softmax  # noqa: F401  (chapter 5)
from tinyqwen.mlp import linear, swiglu  # noqa: F401  (chapter 6)


def route(router_logits: np.ndarray, top_k: int, norm_topk_prob: bool) -> tuple[np.ndarray, np.ndarray]:
    """Choose each token's experts: softmax over ALL experts, keep the top_k largest, optionally renormalise.

    router_logits [N, E] -> (weights [N, top_k] float32, experts [N, top_k] int), largest weight first.
    With norm_topk_prob the k weights of a token are divided by their sum (so they sum to 1); without it they stay
    the plain softmax probabilities (summing to less than 1).

    >>> logits = np.log(np.array([[0.1, 0.6, 0.3]], dtype=np.float32))    # probabilities 0.1, 0.6, 0.3
    >>> w, e = route(logits, top_k=2, norm_topk_prob=False)
    >>> e.tolist(), [round(float(v), 3) for v in w[0]]
    ([[1, 2]], [0.6, 0.3])
    >>> w, e = route(logits, top_k=2, norm_topk_prob=True)
    >>> e.tolist(), [round(float(v), 3) for v in w[0]]
    ([[1, 2]], [0.667, 0.333])
    """
    raise NotImplementedError


def moe_block(
    x: np.ndarray,
    w_router: np.ndarray,
    w_gate: np.ndarray,
    w_up: np.ndarray,
    w_down: np.ndarray,
    top_k: int,
    norm_topk_prob: bool,
) -> tuple[np.ndarray, np.ndarray]:
    """The sparse MoE block: each token through its top_k experts (SwiGLUs), outputs summed with the route weights.

    x [N, d] (tokens, already normalised), w_router [E, d], w_gate [E, f, d], w_up [E, f, d], w_down [E, d, f]
    -> (out [N, d], router_logits [N, E])        router_logits = x @ w_router.T, returned for the balancing loss

    out[n] = Σ over the chosen experts e of weight(n, e) · swiglu(x[n], w_gate[e], w_up[e], w_down[e])

    Worked example, one token, d = f = 1, two experts, top_k = 1: x = [[1]], w_router = [[1], [0]] gives logits
    [1, 0], probabilities [0.7311, 0.2689]: expert 0 wins. With w_gate[0] = [[1]], w_up[0] = [[2]], w_down[0] = [[1]]
    expert 0 gives silu(1) · 2 = 1.4621; the output is 1.4621 with norm_topk_prob (weight 1), else
    0.7311 · 1.4621 = 1.0689.

    >>> one = np.ones((2, 1, 1), dtype=np.float32)
    >>> out, logits = moe_block(np.ones((1, 1)), np.array([[1.0], [0.0]]), one, 2 * one, one, 1, False)
    >>> out.round(4).tolist(), logits.tolist()
    ([[1.0689]], [[1.0, 0.0]])
    """
    raise NotImplementedError


def is_moe_layer(layer: int, num_experts: int, decoder_sparse_step: int, mlp_only_layers: list[int]) -> bool:
    """Whether decoder layer `layer` (counting from 0) has experts, by the config keys transformers uses.

    A layer is MoE when the model has experts, the layer is not listed in mlp_only_layers, and it falls on the
    sparse step: with decoder_sparse_step = 2, layers 1, 3, 5, … (not 0, 2, 4, …).

    >>> [is_moe_layer(i, num_experts=8, decoder_sparse_step=2, mlp_only_layers=[3]) for i in range(6)]
    [False, True, False, False, False, True]
    """
    raise NotImplementedError


def load_balancing_loss(router_logits: list[np.ndarray], num_experts: int, top_k: int) -> float:
    """The auxiliary load-balancing loss E · Σ_e f_e · P_e (Switch Transformer; transformers' aux_loss, unscaled).

    router_logits: one [N, E] array per MoE layer; every layer's rows are pooled into one batch of rows.
    f_e: the fraction of rows whose top_k experts include e (Σ_e f_e = top_k).
    P_e: the mean softmax probability of expert e over the rows (Σ_e P_e = 1).
    Even routing gives exactly top_k; routing every row to the same experts approaches num_experts.

    >>> cyclic = -np.array([[(e - n) % 4 for e in range(4)] for n in range(4)], dtype=np.float32)  # row n prefers n
    >>> round(load_balancing_loss([cyclic], num_experts=4, top_k=2), 6)
    2.0
    """
    raise NotImplementedError
