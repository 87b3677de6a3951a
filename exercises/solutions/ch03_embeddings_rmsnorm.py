"""Chapter 3 solutions: tinyqwen's RMSNorm (tinyqwen/norm.py), and the embedding lookup as tinyqwen's model does it.

tinyqwen has no separate embedding function: its model indexes the table (`x = w.embed[ids]` in
tinyqwen/model.py) after checking the ids' range (`Qwen3._check_ids`). `embed` below does the same two steps.
"""

from __future__ import annotations

import numpy as np

from tinyqwen.norm import rms_norm as _rms_norm


def embed(ids: np.ndarray, table: np.ndarray) -> np.ndarray:
    ids = np.asarray(ids)
    if ids.size and (ids.min() < 0 or ids.max() >= table.shape[0]):
        raise IndexError(
            f"token id {int(ids.min()) if ids.min() < 0 else int(ids.max())} is outside [0, {table.shape[0]})"
        )
    return table[ids]


def rms_norm(x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    return _rms_norm(x, weight, eps)
