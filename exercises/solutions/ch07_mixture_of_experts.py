"""Chapter 7 solutions: routing, the expert block and the auxiliary loss, written out (tinyqwen/moe.py is the
library's version)."""

from __future__ import annotations

import numpy as np

from exercises.solutions.ch05_attention import softmax
from exercises.solutions.ch06_dense_model import linear, swiglu


def route(router_logits: np.ndarray, top_k: int, norm_topk_prob: bool) -> tuple[np.ndarray, np.ndarray]:
    # [N, E] -> weights [N, k], experts [N, k]
    probs = softmax(np.asarray(router_logits, dtype=np.float32), axis=-1)  # softmax over ALL experts first
    # a stable sort of -probs: descending, and a tie goes to the lower expert index (as torch.topk does here)
    experts = np.argsort(-probs, axis=-1, kind="stable")[:, :top_k]  # [N, k]
    weights = np.take_along_axis(probs, experts, axis=-1)  # [N, k]
    if norm_topk_prob:  # Qwen3-MoE renormalises the k chosen weights to sum to 1 (Mixtral-style)
        weights = weights / weights.sum(axis=-1, keepdims=True)
    return weights, experts


def moe_block(
    x: np.ndarray,  # [N, d]
    w_router: np.ndarray,  # [E, d]
    w_gate: np.ndarray,  # [E, f, d]
    w_up: np.ndarray,  # [E, f, d]
    w_down: np.ndarray,  # [E, d, f]
    top_k: int,
    norm_topk_prob: bool,
) -> tuple[np.ndarray, np.ndarray]:  # -> [N, d], router logits [N, E]
    router_logits = linear(x, w_router)  # [N, E]
    weights, experts = route(router_logits, top_k, norm_topk_prob)
    out = np.zeros_like(x)
    for e in range(w_router.shape[0]):  # loop over experts: each runs once, on the tokens that chose it
        token, slot = np.nonzero(experts == e)  # [n_e] x2
        if token.size:
            out[token] += swiglu(x[token], w_gate[e], w_up[e], w_down[e]) * weights[token, slot, None]
    return out, router_logits


def is_moe_layer(layer: int, num_experts: int, decoder_sparse_step: int, mlp_only_layers: list[int]) -> bool:
    # every decoder_sparse_step-th layer counting from 1 (layer index + 1), unless listed as dense
    return num_experts > 0 and layer not in mlp_only_layers and (layer + 1) % decoder_sparse_step == 0


def load_balancing_loss(router_logits: list[np.ndarray], num_experts: int, top_k: int) -> float:
    if not router_logits:
        return 0.0
    # transformers pools every layer's rows before taking the statistics ("global" balance)
    logits = np.concatenate([np.asarray(r, dtype=np.float32).reshape(-1, num_experts) for r in router_logits])
    probs = softmax(logits, axis=-1)  # [L·N, E]
    _, experts = route(logits, top_k, norm_topk_prob=False)  # [L·N, k]
    f = np.bincount(experts.ravel(), minlength=num_experts) / logits.shape[0]  # [E] picks per row: sums to k
    p = probs.mean(axis=0)  # [E] mean router probability
    return float(num_experts * np.sum(f * p))  # uniform routing gives exactly top_k
