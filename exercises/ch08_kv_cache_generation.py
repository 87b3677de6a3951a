"""Chapter 8 exercises: the KV cache and generation.

Fill in each function, in order (the notebook notebooks/08-kv-cache-generation.ipynb builds them in the same order),
then run `pytest exercises/test_ch08_kv_cache_generation.py`. Each docstring gives the shapes and a worked example.

Conventions: logits rows are 1-D float arrays `[V]`; a token that a filter removes gets the logit `-np.inf`
(probability 0 after the softmax), the others keep their value unchanged. Write plain NumPy; no tinyqwen imports are
needed (the `model` given to `greedy_generate` is a tinyqwen model — see its docstring for the two methods you use).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def kv_cache_update(
    cache_k: np.ndarray, cache_v: np.ndarray, k: np.ndarray, v: np.ndarray, length: int
) -> tuple[np.ndarray, np.ndarray]:
    """Write new keys/values into a preallocated cache after the first `length` positions; return all so far.

    cache_k, cache_v: [B, Hkv, max_len, d]   preallocated (zeros where nothing was written yet); modify IN PLACE
    k, v:             [B, Hkv, T, d]         the T new positions' keys and values
    length:           positions already filled (the same for every row)
    returns           ([B, Hkv, length + T, d], [B, Hkv, length + T, d]): every key/value so far, old then new
                      (views of the cache are best: no copy)

    >>> ck, cv = np.zeros((1, 1, 4, 1)), np.zeros((1, 1, 4, 1))
    >>> keys, _ = kv_cache_update(ck, cv, np.ones((1, 1, 2, 1)), np.ones((1, 1, 2, 1)), 0)
    >>> keys, _ = kv_cache_update(ck, cv, np.full((1, 1, 1, 1), 7.0), np.ones((1, 1, 1, 1)), 2)
    >>> keys[0, 0, :, 0].tolist(), ck[0, 0, :, 0].tolist()
    ([1.0, 1.0, 7.0], [1.0, 1.0, 7.0, 0.0])
    """
    raise NotImplementedError


def kv_cache_bytes(config: dict, n_tokens: int, bytes_per_value: int) -> int:
    """Bytes the KV cache of ONE sequence of `n_tokens` tokens takes, for a model's config.json (a dict).

    Keys and values, for every layer, for every *key/value* head, head_dim numbers each.
    Keys you need: "num_hidden_layers", "num_key_value_heads", "head_dim".

    >>> kv_cache_bytes({"num_hidden_layers": 2, "num_key_value_heads": 3, "head_dim": 4,
    ...                 "num_attention_heads": 6, "hidden_size": 24}, n_tokens=10, bytes_per_value=2)
    960
    """
    raise NotImplementedError


def apply_temperature(logits: np.ndarray, temperature: float) -> np.ndarray:
    """Logits reshaped by a temperature T > 0: softmax(result) is p_i ∝ exp(z_i / T).  [V] -> [V]

    >>> apply_temperature(np.array([2.0, 1.0, -1.0]), 0.5)
    array([ 4.,  2., -2.])
    """
    raise NotImplementedError


def top_k_filter(logits: np.ndarray, k: int) -> np.ndarray:
    """Keep the k largest logits (ties with the k-th largest are kept too); the rest become -inf.  [V] -> [V]

    >>> top_k_filter(np.array([1.0, 3.0, 2.0, 0.0]), 2)
    array([-inf,   3.,   2., -inf])
    """
    raise NotImplementedError


def top_p_filter(logits: np.ndarray, p: float) -> np.ndarray:
    """Nucleus filter: keep the smallest set of most likely tokens whose probabilities sum to at least p.

    Sort the probabilities (softmax of the logits) from most to least likely; a token is kept when the mass of
    the tokens before it is still below p. So the most likely token is always kept, and so is the token that
    carries the sum across p.  [V] -> [V]

    >>> probs = np.array([0.5, 0.3, 0.15, 0.05])
    >>> top_p_filter(np.log(probs), 0.7)   # 0.5 < 0.7, then 0.5 + 0.3 crosses it: two tokens
    array([-0.69314718, -1.2039728 ,        -inf,        -inf])
    >>> top_p_filter(np.log(probs), 0.4)   # the first token alone crosses 0.4
    array([-0.69314718,        -inf,        -inf,        -inf])
    """
    raise NotImplementedError


def min_p_filter(logits: np.ndarray, min_p: float) -> np.ndarray:
    """Keep the tokens whose probability is at least `min_p` times the most likely token's probability.  [V] -> [V]

    >>> min_p_filter(np.log(np.array([0.6, 0.3, 0.1])), 0.2)  # threshold 0.2 · 0.6 = 0.12
    array([-0.51082562, -1.2039728 ,        -inf])
    """
    raise NotImplementedError


def repetition_penalty(logits: np.ndarray, seen_ids: Sequence[int], penalty: float) -> np.ndarray:
    """Make every token already in the text less likely (the CTRL rule, as transformers implements it).

    For each distinct id in `seen_ids` (once, however often it appears): a positive logit is divided by
    `penalty`, a negative one multiplied by it. Other logits are unchanged; the input is not modified.  [V] -> [V]

    >>> repetition_penalty(np.array([2.0, -2.0, 1.0]), [0, 1, 1], 2.0)
    array([ 1., -4.,  1.])
    """
    raise NotImplementedError


def sampling_distribution(
    logits: np.ndarray,
    seen_ids: Sequence[int],
    temperature: float,
    top_k: int,
    top_p: float,
    min_p: float,
    penalty: float,
) -> np.ndarray:
    """The probabilities a sampler draws the next token from: the whole pipeline, in transformers' order.

    repetition penalty -> temperature -> top-k -> top-p -> min-p -> softmax.   [V] -> [V] (sums to 1)

    >>> p = sampling_distribution(np.array([2.0, 1.0, 0.0, -1.0]), [3], temperature=1.0, top_k=2, top_p=1.0,
    ...                           min_p=0.0, penalty=1.0)
    >>> p.round(4).tolist()
    [0.7311, 0.2689, 0.0, 0.0]
    """
    raise NotImplementedError


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Prompts of different lengths as one rectangle, padded on the LEFT, and its attention mask.

    returns ids [B, P] int, mask [B, P] int (1 = real token, 0 = padding), P = the longest prompt's length

    >>> ids, mask = left_pad([[5, 6, 7], [8]], pad_id=0)
    >>> ids.tolist(), mask.tolist()
    ([[5, 6, 7], [0, 0, 8]], [[1, 1, 1], [0, 0, 1]])
    """
    raise NotImplementedError


def positions_from_mask(mask: np.ndarray) -> np.ndarray:
    """Each real token's position: how many real tokens come before it in its row.  [B, S] -> [B, S] int

    (Padding entries may hold anything — they are masked out — but 0 is the usual choice.)

    >>> positions_from_mask(np.array([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])).tolist()
    [[0, 0, 0, 1, 2], [0, 1, 2, 3, 4]]
    """
    raise NotImplementedError


def greedy_generate(
    model, prompts: Sequence[Sequence[int]], max_new_tokens: int, pad_id: int = 0, eos_id: int | None = None
) -> list[list[int]]:
    """Greedy generation with a KV cache, for a batch of prompts (left-padded). Returns each row's NEW ids.

    `model` is a tinyqwen model; you need two of its methods:

        cache = model.new_cache(batch_size, max_len)        # an empty KV cache (the grader's runs YOUR kv_cache_update)
        out = model.forward(ids,                            # [B, T] int ids: the new tokens only
                            cache=cache,                    # reads and extends the cache
                            attention_mask=mask,            # [B, past + T] 0/1: every column so far, pads = 0
                            positions=positions,            # [B, T] int: the new tokens' positions
                            last_only=True)                 # logits of the last position only
        out.logits                                          # [B, 1, vocab]

    Prefill all prompts at once (left_pad), then feed ONE token per row per step. Use left_pad and
    positions_from_mask. Every row makes `max_new_tokens` tokens, except that a row stops after producing
    `eos_id` (which is kept as its last token); ties in the arg-max go to the lowest id (np.argmax does that).

    >>> import tinyqwen                                                          # doctest: +SKIP
    >>> model = tinyqwen.load_model("tests/fixtures/dense-tied")                 # doctest: +SKIP
    >>> greedy_generate(model, [[178, 244, 202], [248, 431]], 3)                 # doctest: +SKIP
    [[60, 145, 474], [474, 125, 474]]
    """
    raise NotImplementedError
