"""One forward over several groups of rows at once: a server step's decode rows and a prefill chunk together.

    step's tokens:  [ decode rows: D x 1 | prefill chunk: P x T ]   -> every product on D + P·T token rows,
                                                                       one pass over the weights
                    attention: each group over its own cache (decode rows: a RaggedKVCache; the chunk: its rows)

A scheduler that runs a prefill chunk and the decode step as two forwards reads every weight twice per step, and the
running streams wait for the chunk's whole forward before their own. vLLM's chunked prefill (and llama.cpp's server)
put both in one batch: the decode rows ride along the chunk's products (on a compute-bound prefill, 16 more rows
next to a chunk of 64-256 cost 6-25 % more, where a separate 16-row step costs a whole pass over the weights). This
is `Qwen3.forward` with its token rows taken from several groups: the products (q/k/v, o, MLP, lm_head) run on
all groups' rows stacked; RoPE, the cache writes and attention run per group, each group exactly as the model
runs it alone (its own positions, mask and cache). A row's logits differ from its group run alone only by the
float32 rounding of the products over more rows (the numba backend's tiles or BLAS instead of its one-row loops).
"""

from __future__ import annotations

import numpy as np

from tinyqwen.attention import CausalMask
from tinyqwen.model import MoEWeights, Qwen3


def forward_groups(
    model: Qwen3, groups: list[tuple[np.ndarray, object, np.ndarray | None]]
) -> list[np.ndarray]:
    """Logits [B_g, 1, vocab] per group: group g is (ids [B_g, T_g], its KV cache, logits_at [B_g] or None).

    Each group's rows continue its cache, as `model.forward(ids, cache=cache, last_only=True)` (or
    `logits_at=...`) would; every cache grows by its T_g. One group: exactly that call.

    >>> import tempfile, tinyqwen
    >>> from tinyqwen.testing import write_tiny_qwen3
    >>> m = tinyqwen.load_model(write_tiny_qwen3(tempfile.mkdtemp(), with_tokenizer=False))
    >>> a, b = m.new_cache(1, 16), m.new_cache(2, 16)
    >>> outs = forward_groups(m, [(np.array([[1, 2, 3]]), a, None), (np.array([[4], [5]]), b, None)])
    >>> [o.shape for o in outs], a.length, b.length
    ([(1, 1, 151936), (2, 1, 151936)], 3, 1)
    """
    if len(groups) == 1:
        ids, cache, at = groups[0]
        out = model.forward(ids, cache=cache, last_only=at is None, logits_at=at)
        return [np.asarray(out.logits)]
    c, w, k = model.config, model.weights, model.backend
    parts, xs = [], []
    for ids, cache, at in groups:
        ids, mask, positions = model._inputs(ids, cache, None, None)  # checked as forward checks them
        cos, sin = k.rope_cos_sin(positions, model.inv_freq, model.attention_factor)  # [B, T, d] x2
        parts.append((ids.shape, mask, cos, sin, cache, at))
        xs.append(k.embed(w.embed, ids).reshape(ids.size, -1))
    x = np.concatenate(xs)  # [N, H]: every group's token rows, stacked
    for i, layer in enumerate(w.layers):
        x = x + _attention(model, layer, x, parts, i)
        h = k.rms_norm(x, layer.post_attention_norm, c.rms_norm_eps)
        if isinstance(layer.mlp, MoEWeights):
            m = layer.mlp
            y, _ = k.moe_block(h, m.router, m.gate_proj, m.up_proj, m.down_proj, c.num_experts_per_tok,
                               c.norm_topk_prob)  # fmt: skip
            x = x + y
        else:
            x = x + k.swiglu(h, layer.mlp.gate_proj, layer.mlp.up_proj, layer.mlp.down_proj)
    picks, offset = [], 0
    for (B, T), _, _, _, cache, at in parts:
        cache.advance(T)
        cols = np.full(B, T - 1) if at is None else np.asarray(at)
        picks.append(offset + np.arange(B) * T + cols)  # each row's last position (or its logits_at)
        offset += B * T
    logits = k.to_numpy(k.linear(k.rms_norm(x[np.concatenate(picks)], w.norm, c.rms_norm_eps), w.lm_head))
    bounds = np.cumsum([0] + [len(p) for p in picks])
    return [logits[lo:hi, None] for lo, hi in zip(bounds[:-1], bounds[1:], strict=True)]


def _attention(model: Qwen3, layer, x: np.ndarray, parts: list, i: int) -> np.ndarray:  # [N, H] -> [N, H]
    # Qwen3._attention on stacked rows: the projections and QK-Norm over all rows, the rest group by group
    c, a, k = model.config, layer.attn, model.backend
    N, d = x.shape[0], c.head_dim
    h = k.rms_norm(x, layer.input_norm, c.rms_norm_eps)
    q, kk, v = (p.reshape(N, -1, d) for p in k.linear_many(h, (a.q_proj, a.k_proj, a.v_proj)))
    if c.qk_norm:
        q = k.rms_norm(q, a.q_norm, c.rms_norm_eps)
        kk = k.rms_norm(kk, a.k_norm, c.rms_norm_eps)
    outs, offset = [], 0
    for (B, T), mask, cos, sin, cache, _ in parts:
        rows = slice(offset, offset + B * T)
        offset += B * T
        qg = k.apply_rope(q[rows].reshape(B, T, -1, d).transpose(0, 2, 1, 3), cos, sin)  # [B, Hq, T, d]
        kg = k.apply_rope(kk[rows].reshape(B, T, -1, d).transpose(0, 2, 1, 3), cos, sin)  # [B, Hkv, T, d]
        kg, vg = cache.update(i, kg, v[rows].reshape(B, T, -1, d).transpose(0, 2, 1, 3))
        attend = k.blockwise_attention if isinstance(mask, CausalMask) else k.attention
        outs.append(attend(qg, kg, vg, mask).transpose(0, 2, 1, 3).reshape(B * T, -1))  # [B·T, Hq·d]
    return k.linear(np.concatenate(outs), a.o_proj)
