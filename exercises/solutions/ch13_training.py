"""Chapter 13 solutions: thin adapters onto tinyqwen's own code (tinyqwen/attention.py, norm.py, grad.py, moe.py,
train.py)."""

from __future__ import annotations

import numpy as np

from tinyqwen import train
from tinyqwen.attention import softmax_backward as _softmax_backward
from tinyqwen.grad import cross_entropy_backward as _cross_entropy_backward
from tinyqwen.moe import load_balancing_loss_backward as _load_balancing_loss_backward
from tinyqwen.moe import route_backward as _route_backward
from tinyqwen.norm import rms_norm_backward as _rms_norm_backward

# bound at import: the real-model checkpoint swaps these names inside tinyqwen's modules for the course's functions


def softmax_backward(dy: np.ndarray, y: np.ndarray) -> np.ndarray:
    return _softmax_backward(dy, y)


def rms_norm_backward(
    dy: np.ndarray, x: np.ndarray, weight: np.ndarray, eps: float
) -> tuple[np.ndarray, np.ndarray]:
    return _rms_norm_backward(dy, x, weight, eps)


def cross_entropy_backward(logits: np.ndarray, targets: np.ndarray) -> np.ndarray:
    return _cross_entropy_backward(logits, targets)


def route_backward(
    dweights: np.ndarray, router_logits: np.ndarray, experts: np.ndarray, norm_topk_prob: bool
) -> np.ndarray:
    return _route_backward(dweights, router_logits, experts, norm_topk_prob)


def load_balancing_loss_backward(
    router_logits: list[np.ndarray], num_experts: int, top_k: int, scope: str = "global"
) -> list[np.ndarray]:
    return _load_balancing_loss_backward(router_logits, num_experts, top_k, scope)


def adamw_step(
    p: np.ndarray, g: np.ndarray, m: np.ndarray, v: np.ndarray, step: int, lr: float,
    beta1: float, beta2: float, eps: float, weight_decay: float,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:  # fmt: skip
    # tinyqwen's AdamW never decays 1-D weights (RMSNorm): ask it for a matrix's update, then shape it back
    opt = train.AdamW((beta1, beta2), eps, weight_decay, step=step - 1)
    opt.m, opt.v = {"p": np.array(m).reshape(1, -1)}, {"p": np.array(v).reshape(1, -1)}
    params = {"p": np.array(p).reshape(1, -1)}
    opt.update(params, {"p": np.asarray(g).reshape(1, -1)}, lr)
    return params["p"].reshape(p.shape), opt.m["p"].reshape(p.shape), opt.v["p"].reshape(p.shape)
