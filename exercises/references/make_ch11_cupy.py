"""Reference files for chapter 11 (making it fast on the GPU), made with transformers and torch. tinyqwen is never
imported: these files say what the official implementation computes, not what we compute.

    python exercises/references/make_ch11_cupy.py    # from the repository root, with .[crosscheck] installed

Needs torch and transformers. Deterministic (fixed seeds). Writes ch11_cupy.npz:

rmsnorm.<case>.x        float32 [rows, d]: activations (random normals; "wide" scaled by 1000)
rmsnorm.<case>.weight   float32 [d]
rmsnorm.<case>.y        float32 [rows, d]: transformers' Qwen3RMSNorm(d, eps=1e-6) with that weight, in float32
                        cases: odd [5, 200] (d not a multiple of a warp), head [7, 128] (one head_dim, as QK-Norm),
                        wide [3, 1024] (Qwen3-0.6B's hidden size, values of size 1000)
rope.x                  float32 [2, 3, 5, 16]: queries [B, H, T, d]
rope.cos, rope.sin      float32 [2, 5, 16]: transformers' Qwen3RotaryEmbedding (theta 1e6) at positions 0..4 for row 0
                        and 7..11 for row 1 (so a kernel that reads the wrong row's angles is seen)
rope.y                  float32 [2, 3, 5, 16]: transformers' apply_rotary_pos_emb(x, x, cos, sin)[0]
sample.<case>.logits    float32 [rows, V]
sample.<case>.u         float32 [rows]: one uniform number per row
sample.<case>.ids       int64 [rows]: the first id whose cumulative probability exceeds u, with the probabilities
                        torch.softmax(logits.double() / temperature) (inverse-CDF sampling, in float64)
sample.<case>.temperature  float64 []: cases: warm (T = 0.7, V = 50), hot (T = 1.5), big (logits of size ~100, T = 0.5:
                        exp() of them overflows float32 unless the maximum is subtracted first)
topk.<case>.values      float64 [rows, n]: values to cut
topk.<case>.k           int64 [rows]: k per row (1 and n included)
topk.<case>.kth         float64 [rows]: torch.topk(row, k).values[-1], the k-th largest value (ties counted)
                        cases: ties (integers -3..3, n = 50), signs (both signs, magnitudes 1e-300..1e300, zeros of
                        both signs, n = 40; row 1's cut is zero), logits (normals x 2.5, n = 8000, as a row of logits / T)
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from transformers import Qwen3Config
from transformers.models.qwen3.modeling_qwen3 import Qwen3RMSNorm, Qwen3RotaryEmbedding, apply_rotary_pos_emb

OUT = Path(__file__).resolve().parent / "ch11_cupy.npz"


def rmsnorm(out: dict, case: str, rows: int, d: int, scale: float, seed: int) -> None:
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((rows, d)) * scale).astype(np.float32)
    weight = (1 + 0.1 * rng.standard_normal(d)).astype(np.float32)
    norm = Qwen3RMSNorm(d, eps=1e-6)
    with torch.no_grad():
        norm.weight.copy_(torch.from_numpy(weight))
        y = norm(torch.from_numpy(x)).numpy()
    out |= {f"rmsnorm.{case}.x": x, f"rmsnorm.{case}.weight": weight, f"rmsnorm.{case}.y": y}


def rope(out: dict) -> None:
    rng = np.random.default_rng(11)
    B, H, T, d = 2, 3, 5, 16
    x = rng.standard_normal((B, H, T, d)).astype(np.float32)
    config = Qwen3Config(
        head_dim=d, hidden_size=48, num_attention_heads=3, num_key_value_heads=3, rope_theta=1e6
    )
    emb = Qwen3RotaryEmbedding(config)
    positions = torch.tensor([list(range(T)), list(range(7, 7 + T))])
    xt = torch.from_numpy(x)
    with torch.no_grad():
        cos, sin = emb(xt, positions)
        y, _ = apply_rotary_pos_emb(xt, xt, cos, sin)
    out |= {"rope.x": x, "rope.cos": cos.numpy(), "rope.sin": sin.numpy(), "rope.y": y.numpy()}


def sample(out: dict, case: str, rows: int, V: int, scale: float, temperature: float, seed: int) -> None:
    rng = np.random.default_rng(seed)
    logits = (rng.standard_normal((rows, V)) * scale).astype(np.float32)
    u = rng.random(rows).astype(np.float32)
    probs = torch.softmax(torch.from_numpy(logits).double() / temperature, dim=-1)
    cdf = torch.cumsum(probs, dim=-1)
    target = torch.from_numpy(u).double()[:, None] * cdf[:, -1:]
    ids = torch.searchsorted(cdf, target, right=True).clamp(max=V - 1)[:, 0]
    out |= {
        f"sample.{case}.logits": logits,
        f"sample.{case}.u": u,
        f"sample.{case}.ids": ids.numpy().astype(np.int64),
        f"sample.{case}.temperature": np.float64(temperature),
    }


def topk(out: dict, case: str, rows: int, n: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    if case == "ties":
        values = rng.integers(-3, 4, (rows, n)).astype(np.float64)
    elif case == "signs":
        values = rng.choice([-1.0, 1.0], (rows, n)) * 10.0 ** rng.uniform(-300, 300, (rows, n))
        values[:, :4] = [0.0, -0.0, 0.0, -0.0]
        values = rng.permuted(values, axis=1)
    else:
        values = rng.standard_normal((rows, n)) * 2.5
    ks = rng.integers(1, n + 1, rows)
    ks[0], ks[-1] = 1, n
    if case == "signs":
        ks[1] = int((values[1] > 0).sum()) + 1  # the cut falls on the zeros: +0.0 and -0.0 are one value
    kth = [torch.topk(torch.from_numpy(v), int(k)).values[-1].item() for v, k in zip(values, ks, strict=True)]
    out |= {
        f"topk.{case}.values": values,
        f"topk.{case}.k": ks.astype(np.int64),
        f"topk.{case}.kth": np.array(kth),
    }


def main() -> None:
    out: dict = {}
    rmsnorm(out, "odd", 5, 200, 1.0, 1)
    rmsnorm(out, "head", 7, 128, 2.0, 2)
    rmsnorm(out, "wide", 3, 1024, 1000.0, 3)
    rope(out)
    sample(out, "warm", 16, 50, 2.0, 0.7, 4)
    sample(out, "hot", 16, 50, 2.0, 1.5, 5)
    sample(out, "big", 8, 300, 100.0, 0.5, 6)
    topk(out, "ties", 6, 50, 7)
    topk(out, "signs", 6, 40, 8)
    topk(out, "logits", 2, 8000, 9)
    np.savez_compressed(OUT, **out)
    print(f"wrote {OUT} ({OUT.stat().st_size} bytes, {len(out)} arrays)")


if __name__ == "__main__":
    main()
