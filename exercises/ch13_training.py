"""Chapter 13 exercises: the backward pass and the optimizer — train a tiny Qwen3-MoE.

Write each function, then `pytest exercises/test_ch13_training.py`. Work in the dtype you are given (the tests pass
float64 for the formulas and float32 for AdamW). The notebook notebooks/13-training.ipynb derives every formula.
"""

from __future__ import annotations

import numpy as np


def softmax_backward(dy: np.ndarray, y: np.ndarray) -> np.ndarray:  # [..., n], [..., n] -> [..., n]
    """dL/dx for y = softmax(x) over the last axis, given dL/dy and y itself.

    The Jacobian is diag(y) − y yᵀ, so dx = y ⊙ (dy − Σ_j dy_j y_j) (the sum over the last axis, kept as a column).

    >>> softmax_backward(np.array([1.0, 0.0]), np.array([0.5, 0.5]))
    array([ 0.25, -0.25])
    """
    raise NotImplementedError


def rms_norm_backward(
    dy: np.ndarray, x: np.ndarray, weight: np.ndarray, eps: float
) -> tuple[np.ndarray, np.ndarray]:  # [..., d], [..., d], [d] -> dx [..., d], dweight [d]
    """Gradients of y = x / sqrt(mean(x²) + eps) * weight (RMSNorm over the last axis).

    With r = 1/sqrt(mean(x²) + eps), x̂ = x·r and g = dy ⊙ weight:
        dx      = r · (g − x̂ · mean(g ⊙ x̂))          (the mean over the last axis)
        dweight = Σ over every leading position of dy ⊙ x̂      -> shape [d]

    >>> dx, dw = rms_norm_backward(np.array([[1.0, 0.0]]), np.array([[3.0, 4.0]]), np.ones(2), 0.0)
    >>> dx.round(4), dw.round(4)
    (array([[ 0.181 , -0.1358]]), array([0.8485, 0.    ]))
    """
    raise NotImplementedError


def cross_entropy_backward(logits: np.ndarray, targets: np.ndarray) -> np.ndarray:  # [N, V], [N] -> [N, V]
    """d/dlogits of the MEAN cross-entropy over the rows whose target is not -100 (ignored rows: gradient 0).

    For a counted row: (softmax(logits) − onehot(target)) / n_counted.

    >>> cross_entropy_backward(np.zeros((2, 2)), np.array([0, -100]))
    array([[-0.5,  0.5],
           [ 0. ,  0. ]])
    """
    raise NotImplementedError


def route_backward(
    dweights: np.ndarray, router_logits: np.ndarray, experts: np.ndarray, norm_topk_prob: bool
) -> np.ndarray:  # [N, k], [N, E], [N, k] int -> [N, E]
    """Back through the router: probs = softmax(logits); w = probs at the chosen `experts` (renormalised to sum
    to 1 when norm_topk_prob). Given dL/dw, return dL/dlogits.

    The choice itself has no gradient (it is given as `experts`). With S = Σ_chosen probs and w_j = p_j / S,
    dL/dp_j = (dw_j − Σ_i dw_i·w_i) / S on the chosen experts (just dw_j without renormalisation), 0 elsewhere;
    then the softmax backward spreads it over all E logits.

    >>> route_backward(np.array([[1.0]]), np.zeros((1, 2)), np.array([[0]]), norm_topk_prob=False)
    array([[ 0.25, -0.25]])
    """
    raise NotImplementedError


def load_balancing_loss_backward(
    router_logits: list[np.ndarray], num_experts: int, top_k: int, scope: str = "global"
) -> list[np.ndarray]:  # L × [N, E] -> L × [N, E]
    """d aux / d router logits for aux = E · Σ_e f_e · P_e, one array per MoE layer (same shapes as the input).

    f_e = (top-k picks of expert e) / rows — a count from the top-k *choice*: no gradient flows through it.
    P_e = mean over the rows of softmax(logits)[:, e]. So d aux / d probs[n, e] = E · f_e / M, where M is the
    number of rows the means run over, and then back through the softmax (your softmax_backward).

    scope "global" (transformers): all L layers' rows pooled into one [L·N, E] array before f_e and P_e (M = L·N).
    scope "layer": each layer's own f_e and P_e (M = N), and the L layer losses averaged (another 1/L).

    >>> load_balancing_loss_backward([np.zeros((2, 2))], num_experts=2, top_k=1)[0]  # ties pick expert 0
    array([[ 0.25, -0.25],
           [ 0.25, -0.25]])
    """
    raise NotImplementedError


def adamw_step(
    p: np.ndarray, g: np.ndarray, m: np.ndarray, v: np.ndarray, step: int, lr: float,
    beta1: float, beta2: float, eps: float, weight_decay: float,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:  # fmt: skip
    # [...] x4 -> new p, new m, new v (same shapes); do not modify the inputs
    """One AdamW step (`step` is this step's number, 1 for the first), as torch.optim.AdamW does it:

        p ← p · (1 − lr·weight_decay)                       decoupled decay: straight on the weight
        m ← β1·m + (1 − β1)·g        v ← β2·v + (1 − β2)·g²
        p ← p − lr · (m / (1 − β1^step)) / (sqrt(v / (1 − β2^step)) + eps)

    >>> p, m, v = adamw_step(np.array([1.0]), np.array([2.0]), np.zeros(1), np.zeros(1), 1, 0.1, 0.9, 0.99, 0.0, 0.0)
    >>> p.round(6), m.round(6), v.round(6)      # the first step moves by lr·sign(g)
    (array([0.9]), array([0.2]), array([0.04]))
    """
    raise NotImplementedError
