"""Chapter 8 solutions: thin adapters over tinyqwen's own code (solutions mode grades tinyqwen itself)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from tinyqwen import generation, sampling
from tinyqwen.attention import positions_from_mask as _positions_from_mask
from tinyqwen.kv_cache import KVCache


def kv_cache_update(
    cache_k: np.ndarray, cache_v: np.ndarray, k: np.ndarray, v: np.ndarray, length: int
) -> tuple[np.ndarray, np.ndarray]:
    cache = KVCache(keys=[cache_k], values=[cache_v], length=length)  # one layer, the caller's arrays
    return cache.update(0, k, v)


def kv_cache_bytes(config: dict, n_tokens: int, bytes_per_value: int) -> int:
    # tinyqwen's cache is float32: measure one token's worth, then scale to the count and the number size
    one = KVCache.allocate(
        config["num_hidden_layers"], 1, config["num_key_value_heads"], 1, config["head_dim"]
    )
    return one.nbytes // 4 * n_tokens * bytes_per_value


def apply_temperature(logits: np.ndarray, temperature: float) -> np.ndarray:
    return sampling.process_logits(logits, sampling.SamplingParams(temperature=temperature))


def top_k_filter(logits: np.ndarray, k: int) -> np.ndarray:
    return sampling.top_k_filter(logits, k)


def top_p_filter(logits: np.ndarray, p: float) -> np.ndarray:
    return sampling.top_p_filter(logits, p)


def min_p_filter(logits: np.ndarray, min_p: float) -> np.ndarray:
    return sampling.min_p_filter(logits, min_p)


def repetition_penalty(logits: np.ndarray, seen_ids: Sequence[int], penalty: float) -> np.ndarray:
    return sampling.apply_repetition_penalty(logits, seen_ids, penalty)


def sampling_distribution(
    logits: np.ndarray,
    seen_ids: Sequence[int],
    temperature: float,
    top_k: int,
    top_p: float,
    min_p: float,
    penalty: float,
) -> np.ndarray:
    params = sampling.SamplingParams(
        temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p, repetition_penalty=penalty
    )
    return sampling.softmax(sampling.process_logits(logits, params, prompt_ids=seen_ids))


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    return generation.left_pad(prompts, pad_id)


def positions_from_mask(mask: np.ndarray) -> np.ndarray:
    return _positions_from_mask(mask)


def greedy_generate(
    model, prompts: Sequence[Sequence[int]], max_new_tokens: int, pad_id: int = 0, eos_id: int | None = None
) -> list[list[int]]:
    eos = () if eos_id is None else (eos_id,)
    return generation.generate_batch(
        model,
        prompts,
        max_new_tokens,
        eos_token_ids=eos,
        pad_token_id=pad_id,
        params=sampling.SamplingParams(),
    )
