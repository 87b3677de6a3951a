"""The KV cache: remember every layer's keys and values so each new token costs one position, not T.

Without a cache, generating token t re-runs attention over all t previous tokens in every layer. With it, the
prompt is processed once ("prefill") and each new token only computes its own q, k, v, appends k and v, and attends
over the stored ones ("decode").

The cache is preallocated — no reallocation as it grows — and GQA-shaped: it stores the `num_key_value_heads`
heads, not one copy per query head (Qwen3-0.6B: 8 kv heads instead of 16, half the memory). Per layer:

    keys[layer], values[layer]: [batch, kv_heads, max_len, head_dim]    (float32)

Memory is 2 · layers · batch · kv_heads · max_len · head_dim · 4 bytes: Qwen3-0.6B at 4,096 positions takes
2 · 28 · 8 · 4096 · 128 · 4 B = 0.94 GB per sequence — so we size the cache for the job, never for the model's
40,960-position maximum. Rows of a batch share one `length`; shorter (left-padded) rows mask their padding.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from tinyqwen.errors import GenerationError


@dataclass
class KVCache:
    keys: list[np.ndarray]  # per layer [B, Hkv, max_len, d]
    values: list[np.ndarray]  # per layer [B, Hkv, max_len, d]
    length: int = 0  # positions filled so far (the same for every row)

    @classmethod
    def allocate(
        cls, num_layers: int, batch_size: int, kv_heads: int, max_len: int, head_dim: int, zeros=np.zeros
    ) -> KVCache:
        # `zeros`: the backend's allocator (np.zeros; cupy.zeros puts the cache in GPU memory)
        if batch_size <= 0 or max_len <= 0:
            raise GenerationError(
                f"KV cache needs batch_size > 0 and max_len > 0, got {batch_size}, {max_len}"
            )
        shape = (batch_size, kv_heads, max_len, head_dim)
        return cls(
            keys=[zeros(shape, np.float32) for _ in range(num_layers)],
            values=[zeros(shape, np.float32) for _ in range(num_layers)],
        )

    @property
    def batch_size(self) -> int:
        return self.keys[0].shape[0]

    @property
    def max_len(self) -> int:
        return self.keys[0].shape[2]

    @property
    def nbytes(self) -> int:
        return sum(k.nbytes + v.nbytes for k, v in zip(self.keys, self.values, strict=True))

    def update(self, layer: int, k: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        # [B, Hkv, T, d] x2 -> all keys and values so far [B, Hkv, length + T, d] x2 (views, no copies)
        # writes after `length` but does not advance it: the model advances once, after the last layer
        end = self.length + k.shape[2]
        if end > self.max_len:
            raise GenerationError(f"KV cache is full: {end} positions needed, {self.max_len} allocated")
        self.keys[layer][:, :, self.length : end] = k
        self.values[layer][:, :, self.length : end] = v
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]
