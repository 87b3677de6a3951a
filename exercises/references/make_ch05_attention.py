"""Reference arrays for chapter 5 (attention), made with torch and transformers' own Qwen3 attention code. tinyqwen is
never imported.

    python exercises/references/make_ch05_attention.py    # from the repository root, with .[crosscheck] installed

Needs torch and transformers (the `crosscheck` extra). Every random input has its own fixed seed. Writes
ch05_attention.npz with:

softmax.<case>.{x, axis, out}
    `torch.softmax(x, dim=axis)` in float32.
      rows      x [3, 7] ~ N(0, 2²), axis -1
      middle    x [4, 5, 6] ~ N(0, 2²), axis 1 (not the last axis)
      large     x [3, 7] ~ N(0, 2²) + 1000: exp(1000) overflows float32 (max ~3.4e38 = e^88.7)
      masked    x [3, 6] ~ N(0, 2²) with entries set to float32's most negative value (what a mask writes), one row
                entirely: that row's softmax is uniform

causal.<n_q>x<n_k>
    transformers.masking_utils.sdpa_mask(batch_size=1, q_length=n_q, kv_length=n_k, q_offset=n_k - n_q,
    allow_is_causal_skip=False)[0, 0]: bool [n_q, n_k], True where query i may look at key j. The queries are the
    last n_q of n_k positions (with a KV cache the first n_k - n_q keys come from the cache). Cases 4x4, 1x6, 3x8.

attn.<case>.{q, k, v, mask, out}
    transformers.models.qwen3.modeling_qwen3.eager_attention_forward(module, q, k, v, additive_mask,
    scaling=head_dim**-0.5) with module.num_key_value_groups = Hq // Hkv, in float32. The additive mask is
    `masking_utils.eager_mask(...)` (0 where allowed, float32 min where not), as Qwen3Model builds it; `mask` is the
    same as bool [B, T, S] (True = may attend). `out` is [B, Hq, T, d] (transposed back from eager's [B, T, Hq, d]).
      one_head    B 1, 1 q head, 1 kv head, T = S = 5, d 16, causal
      gqa         B 2, 4 q heads, 2 kv heads, T = S = 6, d 16, causal (each kv head has its own distinct keys)
      qwen3_0_6b  B 1, 16 q heads, 8 kv heads, T = S = 4, d 128 (Qwen3-0.6B's head layout), causal
      cache       B 1, 4 q heads, 2 kv heads, T 3 new queries, S 8 keys (5 from a cache), d 16: q_offset 5
      padding     B 2, 4 q heads, 2 kv heads, T = S = 6, d 16, attention_mask [[0,0,1,1,1,1], [1,1,1,1,1,1]]
                  (left padding): row 0's first two queries see no key at all, so their scores are all float32 min
                  and their output is the plain average of the values
    plus attn.one_head.probs [1, 1, 5, 5]: the attention probabilities, for the notebook.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn
from transformers.masking_utils import eager_mask, sdpa_mask
from transformers.models.qwen3.modeling_qwen3 import eager_attention_forward

HERE = Path(__file__).resolve().parent
NAME = "ch05_attention"
MIN = np.finfo(np.float32).min


def official_attention(q, k, v, attention_mask_2d, past: int):
    """eager_attention_forward with the mask Qwen3Model would build: (out [B, Hq, T, d], probs, bool mask [B, T, S])."""
    B, Hq, T, d = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    module = nn.Module()
    module.num_key_value_groups = Hq // Hkv
    module.eval()
    additive = eager_mask(
        batch_size=B,
        q_length=T,
        kv_length=S,
        q_offset=past,
        attention_mask=None if attention_mask_2d is None else torch.from_numpy(attention_mask_2d).bool(),
        dtype=torch.float32,
    )  # [B, 1, T, S]
    with torch.no_grad():
        out, probs = eager_attention_forward(
            module, *(torch.from_numpy(a) for a in (q, k, v)), additive, scaling=d**-0.5, dropout=0.0
        )
    return out.transpose(1, 2).numpy(), probs.numpy(), (additive[:, 0] == 0).numpy()


def main() -> None:
    out: dict[str, np.ndarray] = {}

    def draw(seed: int, shape, scale: float = 2.0) -> np.ndarray:
        return (scale * np.random.default_rng(seed).standard_normal(shape)).astype(np.float32)

    masked = draw(503, (3, 6))
    masked[0, [4, 5]] = MIN
    masked[1, :] = MIN  # a fully masked row
    softmax_cases = {
        "rows": (draw(501, (3, 7)), -1),
        "middle": (draw(502, (4, 5, 6)), 1),
        "large": (draw(501, (3, 7)) + np.float32(1000), -1),
        "masked": (masked, -1),
    }
    for case, (x, axis) in softmax_cases.items():
        out[f"softmax.{case}.x"], out[f"softmax.{case}.axis"] = x, np.array(axis)
        out[f"softmax.{case}.out"] = torch.softmax(torch.from_numpy(x), dim=axis).numpy()
        assert np.isfinite(out[f"softmax.{case}.out"]).all()

    for n_q, n_k in [(4, 4), (1, 6), (3, 8)]:
        mask = sdpa_mask(
            batch_size=1, q_length=n_q, kv_length=n_k, q_offset=n_k - n_q, allow_is_causal_skip=False
        )
        out[f"causal.{n_q}x{n_k}"] = mask[0, 0].numpy()

    cases = {
        # name: (B, Hq, Hkv, T, S, d, attention_mask_2d, seed)
        "one_head": (1, 1, 1, 5, 5, 16, None, 511),
        "gqa": (2, 4, 2, 6, 6, 16, None, 512),
        "qwen3_0_6b": (1, 16, 8, 4, 4, 128, None, 513),
        "cache": (1, 4, 2, 3, 8, 16, None, 514),
        "padding": (2, 4, 2, 6, 6, 16, np.array([[0, 0, 1, 1, 1, 1], [1] * 6]), 515),
    }
    for case, (B, Hq, Hkv, T, S, d, attention_mask_2d, seed) in cases.items():
        rng = np.random.default_rng(seed)
        # queries and keys of size ~1.3 per channel: scores of size ~1-3 after the 1/sqrt(d) scale, so the softmax
        # is neither uniform nor one-hot and every mistake shows
        q = (1.3 * rng.standard_normal((B, Hq, T, d))).astype(np.float32)
        k = (1.3 * rng.standard_normal((B, Hkv, S, d))).astype(np.float32)
        v = rng.standard_normal((B, Hkv, S, d)).astype(np.float32)
        o, probs, mask = official_attention(q, k, v, attention_mask_2d, past=S - T)
        out |= {f"attn.{case}.q": q, f"attn.{case}.k": k, f"attn.{case}.v": v}
        out[f"attn.{case}.mask"], out[f"attn.{case}.out"] = mask, o
        if case == "one_head":
            out[f"attn.{case}.probs"] = probs
        assert np.isfinite(o).all()

    path = HERE / f"{NAME}.npz"
    np.savez_compressed(path, **out)
    print(
        f"wrote {path.relative_to(HERE.parents[1])}: {len(out)} arrays, {path.stat().st_size / 1024:.0f} KiB"
    )
    print(f"torch {torch.__version__}, transformers {__import__('transformers').__version__}")


if __name__ == "__main__":
    main()
