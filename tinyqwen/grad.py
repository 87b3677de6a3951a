"""The training loss of a whole Qwen3 and its gradient with respect to every weight (chapter 13).

    loss = cross_entropy(logits[:, :-1], ids[:, 1:]) + router_aux_loss_coef · load_balancing_loss(router logits)

exactly what transformers' `Qwen3ForCausalLM` / `Qwen3MoeForCausalLM` compute with `labels=ids` (and
`output_router_logits=True` for the MoE aux term) — with `aux_scope="layer"`, instead, the aux loss is computed
per MoE layer and averaged (Switch Transformer / GShard style; transformers has no such option). `loss_and_grads` runs a forward pass that keeps what the backward
needs, then walks the layers in reverse, calling each component's backward that sits next to its forward:

    rms_norm_backward (norm.py) · apply_rope_backward (rope.py) · attention_backward (attention.py)
    linear_backward, swiglu_backward (mlp.py) · moe_block_backward, load_balancing_loss_backward (moe.py)
    embedding_backward, cross_entropy_backward (here)

Plain NumPy, no autograd: every gradient is a formula you can read. The forward is the inference forward's
arithmetic (same functions, same order), so its logits equal `model(ids)`'s.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from tinyqwen.attention import attention, attention_backward, causal_mask, softmax
from tinyqwen.config import Qwen3Config
from tinyqwen.errors import GenerationError
from tinyqwen.mlp import linear, linear_backward, swiglu, swiglu_backward
from tinyqwen.model import AttentionWeights, LayerWeights, MoEWeights, Weights
from tinyqwen.moe import (
    load_balancing_loss,
    load_balancing_loss_backward,
    moe_block,
    moe_block_backward,
    route,
)
from tinyqwen.norm import rms_norm, rms_norm_backward
from tinyqwen.rope import apply_rope, apply_rope_backward, rope_cos_sin, rope_parameters

IGNORE = -100  # a target that counts for nothing (transformers' ignore_index)


# --------------------------------------------------------------------------------------------- small pieces


def cross_entropy(logits: np.ndarray, targets: np.ndarray) -> float:  # [N, V], [N] int -> mean loss
    """Mean of −log softmax(logits)[target] over the rows whose target is not IGNORE (-100).

    >>> round(cross_entropy(np.zeros((2, 4)), np.array([1, -100])), 4)   # uniform over 4: ln 4
    1.3863
    """
    keep = targets != IGNORE
    if not keep.any():
        return 0.0
    z = logits[keep].astype(np.float64)  # the log-sum-exp in float64: a loss is one number, make it exact
    z = z - z.max(axis=-1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(axis=-1, keepdims=True))
    return float(-logp[np.arange(len(z)), targets[keep]].mean())


def cross_entropy_backward(logits: np.ndarray, targets: np.ndarray) -> np.ndarray:  # [N, V], [N] -> [N, V]
    """d(mean cross-entropy)/d logits = (softmax(logits) − onehot(target)) / n_counted, 0 on IGNORE rows.

    >>> cross_entropy_backward(np.zeros((1, 2)), np.array([0])).tolist()
    [[-0.5, 0.5]]
    """
    keep = targets != IGNORE
    n = max(int(keep.sum()), 1)
    d = softmax(logits)
    d[np.arange(len(targets)), np.where(keep, targets, 0)] -= 1.0
    d[~keep] = 0.0
    return d / np.asarray(n, dtype=logits.dtype)


def embedding_backward(dx: np.ndarray, ids: np.ndarray, vocab_size: int) -> np.ndarray:
    # [B, T, H], [B, T] -> [vocab, H]
    """The lookup x = table[ids] copies rows, so each row of the table collects the sum of the gradients of the
    positions that used it (`np.add.at`, because one id can appear many times); unused rows get 0.

    >>> embedding_backward(np.ones((1, 3, 1)), np.array([[2, 0, 2]]), 4)[:, 0].tolist()
    [1.0, 0.0, 2.0, 0.0]
    """
    d = np.zeros((vocab_size, dx.shape[-1]), dtype=dx.dtype)
    np.add.at(d, ids.reshape(-1), dx.reshape(-1, dx.shape[-1]))
    return d


def next_token_targets(ids: np.ndarray) -> np.ndarray:  # [B, T] -> [B, T]
    """Position t predicts ids[t + 1]; the last position has no target (transformers' label shift).

    >>> next_token_targets(np.array([[5, 6, 7]])).tolist()
    [[6, 7, -100]]
    """
    return np.concatenate([ids[:, 1:], np.full((ids.shape[0], 1), IGNORE, dtype=ids.dtype)], axis=1)


# --------------------------------------------------------------------------------------------- parameters


def zeros_like_weights(w: Weights) -> Weights:
    """A Weights of zero arrays in the same structure; a tied lm_head is again the same array as embed."""

    def z(a):
        return np.zeros(a.shape, dtype=a.dtype)

    layers = []
    for layer in w.layers:
        a = layer.attn
        attn = AttentionWeights(*(z(getattr(a, n)) for n in AttentionWeights.__dataclass_fields__))
        m = layer.mlp
        mlp = type(m)(*(z(getattr(m, n)) for n in type(m).__dataclass_fields__))
        layers.append(LayerWeights(z(layer.input_norm), attn, z(layer.post_attention_norm), mlp))
    embed = z(w.embed)
    return Weights(embed, layers, z(w.norm), embed if w.lm_head is w.embed else z(w.lm_head))


def named_parameters(w: Weights) -> dict[str, np.ndarray]:
    """Every trainable array once (a tied lm_head is not listed twice), by checkpoint-like names.

    Experts stay stacked ("model.layers.0.mlp.experts.gate_proj" is [E, f, H]); `hf_tensors` in train.py splits
    them into the official one-tensor-per-expert names.
    """
    out = {"model.embed_tokens.weight": w.embed}
    for i, layer in enumerate(w.layers):
        p = f"model.layers.{i}."
        out[p + "input_layernorm.weight"] = layer.input_norm
        for n in ("q_proj", "k_proj", "v_proj", "o_proj", "q_norm", "k_norm"):
            out[p + f"self_attn.{n}.weight"] = getattr(layer.attn, n)
        out[p + "post_attention_layernorm.weight"] = layer.post_attention_norm
        if isinstance(layer.mlp, MoEWeights):
            out[p + "mlp.gate.weight"] = layer.mlp.router
            for n in ("gate_proj", "up_proj", "down_proj"):
                out[p + f"mlp.experts.{n}"] = getattr(layer.mlp, n)
        else:
            for n in ("gate_proj", "up_proj", "down_proj"):
                out[p + f"mlp.{n}.weight"] = getattr(layer.mlp, n)
    out["model.norm.weight"] = w.norm
    if w.lm_head is not w.embed:
        out["lm_head.weight"] = w.lm_head
    return out


# --------------------------------------------------------------------------------------------- the whole model


@dataclass
class LossAndGrads:
    loss: float  # the total: ce + aux_coef · aux
    ce: float  # mean next-token cross-entropy
    aux: float  # the unscaled load-balancing loss (0 for a dense model)
    grads: Weights  # dL/dW in the structure of the weights (tied: grads.lm_head is grads.embed)
    expert_counts: list[np.ndarray] = field(
        default_factory=list
    )  # per MoE layer [E]: (token, slot) pairs routed
    logits: np.ndarray | None = None  # [B, T, V]


def _layer_forward(c: Qwen3Config, layer: LayerWeights, x, cos, sin, mask):
    """One decoder layer, keeping what its backward needs: (output [B, T, H], saved dict, router logits or None)."""
    B, T, _ = x.shape
    a = layer.attn
    h = rms_norm(x, layer.input_norm, c.rms_norm_eps)
    qp = linear(h, a.q_proj).reshape(B, T, -1, c.head_dim)  # [B, T, Hq, d] before QK-Norm
    kp = linear(h, a.k_proj).reshape(B, T, -1, c.head_dim)
    qn = rms_norm(qp, a.q_norm, c.rms_norm_eps) if c.qk_norm else qp  # QK-Norm (off only in an ablation)
    kn = rms_norm(kp, a.k_norm, c.rms_norm_eps) if c.qk_norm else kp
    q = apply_rope(qn.transpose(0, 2, 1, 3), cos, sin)  # [B, Hq, T, d]
    k = apply_rope(kn.transpose(0, 2, 1, 3), cos, sin)  # [B, Hkv, T, d]
    v = linear(h, a.v_proj).reshape(B, T, -1, c.head_dim).transpose(0, 2, 1, 3)
    o = attention(q, k, v, mask).transpose(0, 2, 1, 3).reshape(B, T, -1)  # [B, T, Hq·d]
    x2 = x + linear(o, a.o_proj)
    h2 = rms_norm(x2, layer.post_attention_norm, c.rms_norm_eps)
    router_logits = None
    if isinstance(layer.mlp, MoEWeights):
        m = layer.mlp
        y, router_logits = moe_block(
            h2.reshape(B * T, -1), m.router, m.gate_proj, m.up_proj, m.down_proj,
            c.num_experts_per_tok, c.norm_topk_prob,
        )  # fmt: skip
        out = x2 + y.reshape(B, T, -1)
    else:
        out = x2 + swiglu(h2, layer.mlp.gate_proj, layer.mlp.up_proj, layer.mlp.down_proj)
    saved = dict(x=x, h=h, qp=qp, kp=kp, q=q, k=k, v=v, o=o, x2=x2, h2=h2)
    return out, saved, router_logits


def _layer_backward(c: Qwen3Config, layer: LayerWeights, g: LayerWeights, s: dict, dout, cos, sin, mask, drl):
    """Back through one layer: adds dL/dW into `g` (the layer's gradient arrays), returns dL/d(layer input)."""
    B, T, _ = dout.shape
    a, ga = layer.attn, g.attn
    # the MLP half: out = x2 + mlp(rms_norm(x2))
    if isinstance(layer.mlp, MoEWeights):
        m = layer.mlp
        dh2, d_router, d_gate, d_up, d_down = moe_block_backward(
            dout.reshape(B * T, -1), s["h2"].reshape(B * T, -1), m.router, m.gate_proj, m.up_proj,
            m.down_proj, c.num_experts_per_tok, c.norm_topk_prob, drouter_logits=drl,
        )  # fmt: skip
        dh2 = dh2.reshape(B, T, -1)
        g.mlp.router += d_router
    else:
        m = layer.mlp
        dh2, d_gate, d_up, d_down = swiglu_backward(dout, s["h2"], m.gate_proj, m.up_proj, m.down_proj)
    g.mlp.gate_proj += d_gate
    g.mlp.up_proj += d_up
    g.mlp.down_proj += d_down
    dx2, dw = rms_norm_backward(dh2, s["x2"], layer.post_attention_norm, c.rms_norm_eps)
    g.post_attention_norm += dw
    dx2 = dx2 + dout  # the residual connection passes the gradient straight through
    # the attention half: x2 = x + o_proj(attention(...))
    do, dw = linear_backward(dx2, s["o"], a.o_proj)
    ga.o_proj += dw
    do = do.reshape(B, T, -1, c.head_dim).transpose(0, 2, 1, 3)  # [B, Hq, T, d]
    dq, dk, dv = attention_backward(do, s["q"], s["k"], s["v"], mask)
    dqn = apply_rope_backward(dq, cos, sin).transpose(0, 2, 1, 3)  # [B, T, Hq, d]
    dkn = apply_rope_backward(dk, cos, sin).transpose(0, 2, 1, 3)
    if c.qk_norm:
        dqp, dw = rms_norm_backward(dqn, s["qp"], a.q_norm, c.rms_norm_eps)
        ga.q_norm += dw
        dkp, dw = rms_norm_backward(dkn, s["kp"], a.k_norm, c.rms_norm_eps)
        ga.k_norm += dw
    else:
        dqp, dkp = dqn, dkn
    dh = np.zeros_like(s["h"])
    for d_proj, w, name in (
        (dqp, a.q_proj, "q_proj"),
        (dkp, a.k_proj, "k_proj"),
        (dv.transpose(0, 2, 1, 3), a.v_proj, "v_proj"),
    ):
        dxp, dw = linear_backward(d_proj.reshape(B, T, -1), s["h"], w)
        dh += dxp
        getattr(ga, name)[...] += dw
    dx, dw = rms_norm_backward(dh, s["x"], layer.input_norm, c.rms_norm_eps)
    g.input_norm += dw
    return dx + dx2


def loss_and_grads(
    config: Qwen3Config,
    weights: Weights,
    ids: np.ndarray,  # [B, T] int
    targets: np.ndarray | None = None,  # [B, T] int (IGNORE = no target); default: the next token of ids
    aux_coef: float | None = None,  # default: config.router_aux_loss_coef (MoE only)
    grads: Weights | None = None,  # add into these (gradient accumulation); default: fresh zeros
    grad_scale: float = 1.0,  # multiply this batch's gradient by it before adding (1 / accumulation steps)
    keep_logits: bool = False,
    forward_only: bool = False,  # only the losses (evaluation): no activations kept, no backward
    aux_scope: str = "global",  # "global": transformers' pooled aux loss; "layer": per MoE layer, averaged
) -> LossAndGrads:
    """Forward and backward of the training loss on one batch; every weight's gradient in `grads`.

    The dtype of the weights is the dtype of the computation (float32 to train, float64 for gradient checks).
    """
    c = config
    ids = np.asarray(ids)
    if ids.ndim != 2 or ids.dtype.kind not in "iu" or ids.shape[1] < 2:
        raise GenerationError(
            f"training ids must be integers of shape [batch, T ≥ 2], got {ids.dtype} {ids.shape}"
        )
    B, T = ids.shape
    if T > c.max_position_embeddings:
        raise GenerationError(
            f"sequence of {T} tokens is longer than max_position_embeddings {c.max_position_embeddings}"
        )
    targets = next_token_targets(ids) if targets is None else np.asarray(targets)
    if aux_coef is None:
        aux_coef = getattr(c, "router_aux_loss_coef", 0.0) or 0.0
    dtype = weights.embed.dtype
    inv_freq, attention_factor = rope_parameters(c)
    cos, sin = rope_cos_sin(np.broadcast_to(np.arange(T), (B, T)), inv_freq, attention_factor)
    cos, sin = cos.astype(dtype), sin.astype(dtype)
    mask = np.broadcast_to(causal_mask(T, T), (B, T, T))

    # forward, keeping each layer's activations
    x = weights.embed[ids]
    saved, router_logits, moe_layers = [], [], []
    for i, layer in enumerate(weights.layers):
        x, s, rl = _layer_forward(c, layer, x, cos, sin, mask)
        saved.append(s)
        if rl is not None:
            router_logits.append(rl)
            moe_layers.append(i)
    hf = rms_norm(x, weights.norm, c.rms_norm_eps)
    logits = linear(hf, weights.lm_head)  # [B, T, V]
    flat_logits, flat_targets = logits.reshape(B * T, -1), targets.reshape(-1)
    ce = cross_entropy(flat_logits, flat_targets)
    aux, drl, counts = 0.0, [None] * len(weights.layers), []
    if router_logits:
        E, k = c.num_experts, c.num_experts_per_tok
        aux = load_balancing_loss(router_logits, E, k, aux_scope)
        if aux_coef:
            for i, d in zip(
                moe_layers, load_balancing_loss_backward(router_logits, E, k, aux_scope), strict=True
            ):
                drl[i] = (d * (aux_coef * grad_scale)).astype(dtype)
        for rl in router_logits:
            _, experts = route(rl, c.num_experts_per_tok, c.norm_topk_prob)
            counts.append(np.bincount(experts.ravel(), minlength=c.num_experts))

    if forward_only:
        return LossAndGrads(ce + aux_coef * aux, ce, aux, grads, counts, logits if keep_logits else None)

    # backward
    g = zeros_like_weights(weights) if grads is None else grads
    dlogits = cross_entropy_backward(flat_logits, flat_targets).reshape(B, T, -1) * dtype.type(grad_scale)
    dhf, dw = linear_backward(dlogits, hf, weights.lm_head)
    g.lm_head += dw  # when tied this *is* g.embed: the output projection's gradient lands in the embedding
    dx, dw = rms_norm_backward(dhf, x, weights.norm, c.rms_norm_eps)
    g.norm += dw
    for i in reversed(range(len(weights.layers))):
        dx = _layer_backward(c, weights.layers[i], g.layers[i], saved[i], dx, cos, sin, mask, drl[i])
    g.embed += embedding_backward(dx, ids, c.vocab_size)
    return LossAndGrads(
        loss=ce + aux_coef * aux,
        ce=ce,
        aux=aux,
        grads=g,
        expert_counts=counts,
        logits=logits if keep_logits else None,
    )


def copy_weights(w: Weights, dtype=np.float32) -> Weights:
    """A writable copy of every array in `dtype` (loaded weights are read-only views of the file); ties kept."""

    def cp(a):
        return np.array(a, dtype=dtype, copy=True)

    layers = []
    for layer in w.layers:
        a, m = layer.attn, layer.mlp
        attn = AttentionWeights(*(cp(getattr(a, n)) for n in AttentionWeights.__dataclass_fields__))
        mlp = type(m)(*(cp(getattr(m, n)) for n in type(m).__dataclass_fields__))
        layers.append(LayerWeights(cp(layer.input_norm), attn, cp(layer.post_attention_norm), mlp))
    embed = cp(w.embed)
    return Weights(embed, layers, cp(w.norm), embed if w.lm_head is w.embed else cp(w.lm_head))
