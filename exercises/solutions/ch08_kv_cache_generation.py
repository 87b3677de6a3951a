"""Chapter 8 solutions: the KV cache, the sampling filters and batched greedy generation, written out
(tinyqwen/kv_cache.py, tinyqwen/sampling.py and tinyqwen/generation.py are the library's versions)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def kv_cache_update(
    cache_k: np.ndarray, cache_v: np.ndarray, k: np.ndarray, v: np.ndarray, length: int
) -> tuple[
    np.ndarray, np.ndarray
]:  # [B, Hkv, max_len, d] x2, [B, Hkv, T, d] x2 -> [B, Hkv, length + T, d] x2
    end = length + k.shape[2]
    if end > cache_k.shape[2]:
        raise ValueError(f"KV cache is full: {end} positions needed, {cache_k.shape[2]} allocated")
    cache_k[:, :, length:end] = k  # in place: the next step must find these
    cache_v[:, :, length:end] = v
    return cache_k[:, :, :end], cache_v[:, :, :end]  # views of everything so far, no copy


def kv_cache_bytes(config: dict, n_tokens: int, bytes_per_value: int) -> int:
    # keys AND values (2), every layer, every kv head (not query head: GQA is what makes the cache small)
    per_token = 2 * config["num_hidden_layers"] * config["num_key_value_heads"] * config["head_dim"]
    return per_token * n_tokens * bytes_per_value


def apply_temperature(logits: np.ndarray, temperature: float) -> np.ndarray:  # [V] -> [V]
    return np.asarray(logits, dtype=np.float64) / temperature  # T < 1 sharpens, T > 1 flattens


def top_k_filter(logits: np.ndarray, k: int) -> np.ndarray:  # [V] -> [V]
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    kth = np.sort(logits)[-k]  # the k-th largest value
    return np.where(logits < kth, -np.inf, logits)  # `<`, not `<=`: ties with the k-th are kept


def _probs(logits: np.ndarray) -> np.ndarray:  # [V] -> [V] float64; -inf logits get probability 0
    x = np.asarray(logits, dtype=np.float64)
    e = np.exp(x - x.max())
    return e / e.sum()


def top_p_filter(logits: np.ndarray, p: float) -> np.ndarray:  # [V] -> [V]
    if p >= 1.0:
        return logits
    probs = _probs(logits)
    order = np.argsort(-probs, kind="stable")  # most likely first
    mass_before = np.cumsum(probs[order]) - probs[order]  # [V] mass of the tokens before each one
    keep = np.zeros(logits.shape, dtype=bool)
    # kept while the mass before it is below p (a 1e-9 slack: 0.5 + 0.3 must "reach" 0.8 despite rounding);
    # so the top token is always kept, and so is the one that carries the mass over p
    keep[order] = mass_before < p - 1e-9
    keep[order[0]] = True
    return np.where(keep, logits, -np.inf)


def min_p_filter(logits: np.ndarray, min_p: float) -> np.ndarray:  # [V] -> [V]
    if min_p <= 0.0:
        return logits
    probs = _probs(logits)
    # compare probabilities, not logits + log(min_p): the two round differently when probabilities tie
    return np.where(probs >= min_p * probs.max() * (1 - 1e-9), logits, -np.inf)


def repetition_penalty(
    logits: np.ndarray, seen_ids: Sequence[int], penalty: float
) -> np.ndarray:  # [V] -> [V]
    out = np.array(logits, dtype=np.float64)  # a copy: the caller's logits stay as they were
    ids = np.unique(np.asarray(list(seen_ids), dtype=np.int64))  # each seen token once, however often it came
    if ids.size:
        # divide a positive logit, multiply a negative one: both make the token less likely
        out[ids] = np.where(out[ids] > 0, out[ids] / penalty, out[ids] * penalty)
    return out


def sampling_distribution(
    logits: np.ndarray,
    seen_ids: Sequence[int],
    temperature: float,
    top_k: int,
    top_p: float,
    min_p: float,
    penalty: float,
) -> np.ndarray:  # [V] -> [V] probabilities
    x = repetition_penalty(logits, seen_ids, penalty)  # transformers' order: penalty before temperature
    x = apply_temperature(x, temperature)
    x = top_k_filter(x, top_k)
    x = top_p_filter(x, top_p)
    x = min_p_filter(x, min_p)
    return _probs(x)


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    # B prompts -> ids [B, P], mask [B, P]; LEFT, so every row's last real token is in the last column
    width = max(len(p) for p in prompts)
    ids = np.full((len(prompts), width), pad_id, dtype=np.int64)
    mask = np.zeros((len(prompts), width), dtype=np.int64)
    for b, prompt in enumerate(prompts):
        if len(prompt):
            ids[b, width - len(prompt) :] = prompt
            mask[b, width - len(prompt) :] = 1
    return ids, mask


def positions_from_mask(mask: np.ndarray) -> np.ndarray:  # [B, S] 0/1 -> [B, S] int
    # a token's position counts only the real tokens before it; padding gets 0 (masked out anyway)
    return np.maximum(np.cumsum(np.asarray(mask, dtype=np.int64), axis=1) - 1, 0)


def greedy_generate(
    model, prompts: Sequence[Sequence[int]], max_new_tokens: int, pad_id: int = 0, eos_id: int | None = None
) -> list[list[int]]:
    B = len(prompts)
    ids, prompt_mask = left_pad(prompts, pad_id)  # [B, P] x2
    P = ids.shape[1]
    # the mask of every column the cache will ever hold: the prompt's, then 1 for each new token
    mask = np.concatenate([prompt_mask, np.ones((B, max_new_tokens), dtype=np.int64)], axis=1)
    cache = model.new_cache(B, P + max_new_tokens)
    out = model.forward(
        ids,
        cache=cache,
        attention_mask=mask[:, :P],
        positions=positions_from_mask(prompt_mask),
        last_only=True,
    )  # fmt: skip  prefill: the whole prompt once
    outputs: list[list[int]] = [[] for _ in range(B)]
    done = [False] * B
    for step in range(max_new_tokens):
        new = np.argmax(out.logits[:, -1, :], axis=-1)  # [B] ties go to the lowest id
        for b in range(B):
            if not done[b]:
                outputs[b].append(int(new[b]))
                done[b] = eos_id is not None and int(new[b]) == eos_id  # the eos is kept, then the row stops
        if all(done) or step == max_new_tokens - 1:
            break
        end = P + step + 1  # columns so far, including the token fed now
        positions = positions_from_mask(mask[:, :end])[:, -1:]  # [B, 1] the new token's position in its row
        # finished rows still take part (the batch stays a rectangle); nothing reads what they produce
        feed = np.where(done, pad_id, new)[:, None]  # [B, 1] ONE token per row: the cache holds the rest
        out = model.forward(
            feed, cache=cache, attention_mask=mask[:, :end], positions=positions, last_only=True
        )
    return outputs
