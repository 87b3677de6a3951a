"""Chapter 13 solutions: the backward passes the trainer needs and one AdamW step, written out (tinyqwen/grad.py,
norm.py, attention.py, moe.py and train.py are the library's versions)."""

from __future__ import annotations

import numpy as np

IGNORE = -100  # a target that counts for nothing (padding, a prompt the loss should not see)


def _softmax(x: np.ndarray) -> np.ndarray:  # [..., n] -> [..., n]
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def softmax_backward(dy: np.ndarray, y: np.ndarray) -> np.ndarray:  # [..., n], [..., n] -> [..., n]
    # the Jacobian diag(y) - y yᵀ times dy, without building it: y ⊙ (dy - <dy, y>)
    return y * (dy - np.sum(dy * y, axis=-1, keepdims=True))


def rms_norm_backward(
    dy: np.ndarray, x: np.ndarray, weight: np.ndarray, eps: float
) -> tuple[np.ndarray, np.ndarray]:  # [..., d], [..., d], [d] -> dx [..., d], dweight [d]
    r = 1.0 / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps)  # [..., 1] recomputed, not stored
    x_hat = x * r  # [..., d]
    g = dy * weight  # back through the gain
    # every x_j moves r, which scales every output: the second term (no mean(g) term: nothing was centred)
    dx = r * (g - x_hat * np.mean(g * x_hat, axis=-1, keepdims=True))
    dweight = (dy * x_hat).reshape(-1, x.shape[-1]).sum(axis=0)  # summed over every token
    return dx, dweight


def cross_entropy_backward(logits: np.ndarray, targets: np.ndarray) -> np.ndarray:  # [N, V], [N] -> [N, V]
    keep = targets != IGNORE  # [N]
    n = max(int(keep.sum()), 1)  # the loss is a mean over the counted rows only
    d = _softmax(logits)
    d[np.arange(len(targets)), np.where(keep, targets, 0)] -= 1.0  # softmax - onehot(target)
    d[~keep] = 0.0
    return d / np.asarray(n, dtype=logits.dtype)


def route_backward(
    dweights: np.ndarray, router_logits: np.ndarray, experts: np.ndarray, norm_topk_prob: bool
) -> np.ndarray:  # [N, k], [N, E], [N, k] -> [N, E]
    probs = _softmax(router_logits)  # [N, E]
    chosen = np.take_along_axis(probs, experts, axis=-1)  # [N, k] the top-k CHOICE has no gradient
    if norm_topk_prob:  # w_j = p_j / S: back through the division by the sum S of the chosen
        total = chosen.sum(axis=-1, keepdims=True)
        dchosen = (dweights - np.sum(dweights * chosen / total, axis=-1, keepdims=True)) / total
    else:
        dchosen = dweights
    dprobs = np.zeros_like(probs)
    np.put_along_axis(dprobs, experts, dchosen, axis=-1)  # only the chosen probabilities were used
    return softmax_backward(dprobs, probs)  # ... but every logit is in the softmax's denominator


def load_balancing_loss_backward(
    router_logits: list[np.ndarray], num_experts: int, top_k: int, scope: str = "global"
) -> list[np.ndarray]:  # L × [N, E] -> L × [N, E]
    if scope not in ("global", "layer"):
        raise ValueError(f"aux loss scope must be 'global' or 'layer', got {scope!r}")
    flat = [np.asarray(r).reshape(-1, num_experts) for r in router_logits]
    if not flat:
        return []
    # "global": one pool of all layers' rows; "layer": each layer alone, then the mean over layers (another 1/L)
    groups, share = ([np.concatenate(flat)], 1.0) if scope == "global" else (flat, 1.0 / len(flat))
    out = []
    for logits in groups:
        probs = _softmax(logits)  # [M, E]
        experts = np.argsort(-probs, axis=-1, kind="stable")[:, :top_k]  # the same choice the forward made
        f = np.bincount(experts.ravel(), minlength=num_experts) / logits.shape[0]  # [E] counts: no gradient
        dprobs = np.broadcast_to(num_experts * f / logits.shape[0] * share, probs.shape)  # d aux / d probs
        out.append(softmax_backward(dprobs, probs).astype(logits.dtype))
    if scope == "layer":
        return out
    return np.split(out[0], np.cumsum([a.shape[0] for a in flat])[:-1])  # back into one array per layer


def adamw_step(
    p: np.ndarray, g: np.ndarray, m: np.ndarray, v: np.ndarray, step: int, lr: float,
    beta1: float, beta2: float, eps: float, weight_decay: float,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:  # fmt: skip
    # [...] x4 -> new p, m, v; the inputs are left as they were
    p = p * (1 - lr * weight_decay)  # decoupled decay: straight on the weight, not through the gradient
    m = beta1 * m + (1 - beta1) * g  # running mean of the gradient
    v = beta2 * v + (1 - beta2) * g * g  # running mean of its square
    m_hat = m / (1 - beta1**step)  # bias corrections: m and v started at 0
    v_hat = v / (1 - beta2**step)
    return p - lr * m_hat / (np.sqrt(v_hat) + eps), m, v
