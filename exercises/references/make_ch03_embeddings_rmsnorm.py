"""Reference arrays for chapter 3 (embeddings and RMSNorm), made with torch and transformers' own Qwen3RMSNorm.
tinyqwen is never imported.

    python exercises/references/make_ch03_embeddings_rmsnorm.py    # from the repository root, with .[crosscheck] installed

Needs torch and transformers (the `crosscheck` extra). Every input is drawn from its own fixed seed. Writes
ch03_embeddings_rmsnorm.npz with, for each case:

embed.<case>.{ids, table, out}
    `torch.nn.Embedding` with `table` as its weight, applied to `ids` (int64): out = [*ids.shape, dim] float32.
    Cases: `one` (ids [7]), `batch` (ids [2, 5]).

rms.<case>.{x, weight, eps, out}
    `transformers.models.qwen3.modeling_qwen3.Qwen3RMSNorm(d, eps)` with `weight` loaded, in float32, on x.
    Cases:
      vector   x [8]: one vector, the worked example's size
      batch    x [2, 5, 64] with a non-zero mean (N(1.5, 1)): a LayerNorm-style mean subtraction shows at once
      heads    x [2, 5, 4, 32], weight [32]: QK-Norm, normalising each head's head_dim vector of [B, T, H, d]
      tiny     x [3, 16] of size ~1e-3 (mean square ~1e-6, as large as eps = 1e-6) and one all-zero row: where
               eps matters; without eps the zero row is 0/0 = NaN
      large    x [4, 64] of size 300-3000 given as float16 (`x` is stored as float16). Its squares overflow
               float16 (max 65504). The reference is Qwen3RMSNorm in float32 on the float16 values widened exactly
               to float32 — i.e. "compute in float32, return float32". (transformers itself would cast the
               normalised values back to float16 before the weight; our functions return float32.)

rms.bf16.{x, weight, out}
    What a bfloat16 model does: Qwen3RMSNorm with a bf16 weight on bf16 input (x [4, 1024]); it computes the
    statistics in float32, then rounds the normalised values back to bf16 before the weight. All three are stored
    widened to float32. For the notebook's precision discussion, not graded.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from transformers.models.qwen3.modeling_qwen3 import Qwen3RMSNorm

HERE = Path(__file__).resolve().parent
NAME = "ch03_embeddings_rmsnorm"


def rng(seed: int) -> np.random.Generator:
    return np.random.default_rng(seed)


def official_rms(x: np.ndarray, weight: np.ndarray, eps: float, dtype=torch.float32) -> np.ndarray:
    norm = Qwen3RMSNorm(weight.shape[0], eps=eps).to(dtype)
    with torch.no_grad():
        norm.weight.copy_(torch.from_numpy(weight.astype(np.float32)).to(dtype))
        return norm(torch.from_numpy(x.astype(np.float32)).to(dtype)).float().numpy()


def official_embed(ids: np.ndarray, table: np.ndarray) -> np.ndarray:
    embedding = torch.nn.Embedding(*table.shape)
    with torch.no_grad():
        embedding.weight.copy_(torch.from_numpy(table))
        return embedding(torch.from_numpy(ids)).numpy()


def main() -> None:
    out: dict[str, np.ndarray] = {}

    table = rng(301).normal(0, 0.5, size=(20, 8)).astype(np.float32)
    for case, ids in {
        "one": np.array([3, 0, 19, 7, 7, 12, 1]),
        "batch": rng(302).integers(0, 20, size=(2, 5)),
    }.items():
        ids = ids.astype(np.int64)
        out |= {f"embed.{case}.ids": ids, f"embed.{case}.table": table}
        out[f"embed.{case}.out"] = official_embed(ids, table)

    def weight(seed: int, d: int) -> np.ndarray:
        return (1 + 0.3 * rng(seed).standard_normal(d)).astype(np.float32)

    cases = {
        "vector": (rng(311).normal(0, 2, size=8), weight(312, 8), 1e-6),
        "batch": (rng(313).normal(1.5, 1, size=(2, 5, 64)), weight(314, 64), 1e-6),
        "heads": (rng(315).normal(0, 3, size=(2, 5, 4, 32)), weight(316, 32), 1e-6),
        "tiny": (
            np.concatenate([rng(317).normal(0, 1e-3, size=(2, 16)), np.zeros((1, 16))]),
            weight(318, 16),
            1e-6,
        ),
        "large": (
            rng(319).uniform(300, 3000, size=(4, 64)) * rng(320).choice([-1, 1], size=(4, 64)),
            weight(321, 64),
            1e-6,
        ),
    }
    for case, (x, w, eps) in cases.items():
        x = x.astype(np.float16 if case == "large" else np.float32)
        out |= {f"rms.{case}.x": x, f"rms.{case}.weight": w, f"rms.{case}.eps": np.float64(eps)}
        out[f"rms.{case}.out"] = official_rms(x, w, eps)

    # a bf16 model: input and weight are bf16 values (rounded by torch), stored widened to float32
    x = torch.from_numpy(rng(331).normal(0, 4, size=(4, 1024)).astype(np.float32)).bfloat16()
    w = torch.from_numpy(weight(332, 1024)).bfloat16()
    out["rms.bf16.x"] = x.float().numpy()
    out["rms.bf16.weight"] = w.float().numpy()
    out["rms.bf16.out"] = official_rms(x.float().numpy(), w.float().numpy(), 1e-6, dtype=torch.bfloat16)

    np.savez_compressed(HERE / f"{NAME}.npz", **out)
    print(f"{NAME}.npz: {(HERE / f'{NAME}.npz').stat().st_size:,} bytes, {len(out)} arrays")


if __name__ == "__main__":
    main()
