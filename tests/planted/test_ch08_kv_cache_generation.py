"""Planted mistakes for chapter 8: classic generation bugs, injected into the solutions, must fail with their hint."""

from __future__ import annotations

import numpy as np
import pytest

from exercises import test_ch08_kv_cache_generation as grading
from exercises.solutions import ch08_kv_cache_generation as good
from tinyqwen.sampling import softmax

# ------------------------------------------------------------------------------------------ buggy pieces


def top_p_drops_crossing(logits, p):
    """Keeps a token only while the sum INCLUDING it is below p: the crossing token is lost."""
    probs = softmax(logits)
    order = np.argsort(-probs)
    keep = np.zeros(len(logits), bool)
    keep[order] = np.cumsum(probs[order]) < p
    return np.where(keep, logits, -np.inf)


def top_k_plus_one(logits, k):
    return good.top_k_filter(logits, k + 1)


def min_p_absolute(logits, min_p):
    return np.where(softmax(logits) >= min_p, logits, -np.inf)


def penalty_divides_all(logits, seen_ids, penalty):
    out = np.array(logits, dtype=np.float64)
    ids = np.unique(seen_ids)
    out[ids] = out[ids] / penalty
    return out


def temperature_after_softmax(logits, seen_ids, temperature, top_k, top_p, min_p, penalty):
    probs = good.sampling_distribution(logits, seen_ids, 1.0, top_k, top_p, min_p, penalty) / temperature
    return probs / probs.sum()


def pipeline_returns_logits(logits, seen_ids, temperature, top_k, top_p, min_p, penalty):
    z = good.apply_temperature(good.repetition_penalty(logits, seen_ids, penalty), temperature)
    z = good.top_k_filter(z, top_k) if top_k else z
    return good.min_p_filter(good.top_p_filter(z, top_p), min_p)  # the softmax forgotten


def update_returns_only_new(cache_k, cache_v, k, v, length):
    cache_k[:, :, length : length + k.shape[2]] = k
    cache_v[:, :, length : length + v.shape[2]] = v
    return k, v


def bytes_with_query_heads(config, n_tokens, bytes_per_value):
    return (
        2
        * config["num_hidden_layers"]
        * config["num_attention_heads"]
        * config["head_dim"]
        * n_tokens
        * bytes_per_value
    )


def right_pad(prompts, pad_id):
    ids, mask = good.left_pad([p[::-1] for p in prompts], pad_id)
    return ids[:, ::-1].copy(), mask[:, ::-1].copy()


def positions_count_padding(mask):
    return np.broadcast_to(np.arange(mask.shape[1]), mask.shape).copy()


def loop(
    model, prompts, max_new_tokens, pad_id=0, eos_id=None, *, pad=good.left_pad, restart=False, cache=True
):
    """A learner-style greedy loop with switches for the classic bugs (no eos handling needed here).

    cache=True: correct; False: no cache at all; None: a cache is passed but the whole text is fed every step.
    """
    ids, mask = pad(prompts, pad_id)
    B, P = ids.shape
    mask = np.concatenate([mask, np.ones((B, max_new_tokens), dtype=mask.dtype)], axis=1)
    positions = good.positions_from_mask(mask)
    kv = model.new_cache(B, P + max_new_tokens) if cache is not False else None
    out = model.forward(ids, cache=kv, attention_mask=mask[:, :P], positions=positions[:, :P], last_only=True)
    new = [[] for _ in prompts]
    for step in range(max_new_tokens):
        next_ids = np.argmax(out.logits[:, -1], axis=-1)
        for b in range(B):
            new[b].append(int(next_ids[b]))
        if step == max_new_tokens - 1:
            break
        t = P + step
        if cache is True:
            pos = np.zeros((B, 1), np.int64) if restart else positions[:, t : t + 1]
            out = model.forward(next_ids[:, None], cache=kv, attention_mask=mask[:, : t + 1], positions=pos,
                                last_only=True)  # fmt: skip
        elif cache is None:  # the cache is passed, but the whole text is fed again every step
            ids = np.concatenate([ids, next_ids[:, None]], axis=1)
            out = model.forward(
                ids, cache=kv, attention_mask=mask[:, : kv.length + ids.shape[1]], last_only=True
            )
        else:  # the whole text again, every step
            ids = np.concatenate([ids, next_ids[:, None]], axis=1)
            out = model.forward(
                ids, attention_mask=mask[:, : t + 1], positions=positions[:, : t + 1], last_only=True
            )
    return new


# ------------------------------------------------------------------------------------------ the plants


PLANTS = [
    ("top_p_filter", top_p_drops_crossing, grading.test_top_p, "crosses p"),
    ("top_k_filter", top_k_plus_one, grading.test_top_k, "k + 1"),
    ("min_p_filter", min_p_absolute, grading.test_min_p, "not scaled"),
    ("repetition_penalty", penalty_divides_all, grading.test_repetition_penalty, "multiply negative"),
    ("sampling_distribution", temperature_after_softmax, grading.test_sampling_distribution, "after the softmax"),
    ("sampling_distribution", pipeline_returns_logits, grading.test_sampling_distribution, "not probabilities"),
    ("kv_cache_update", update_returns_only_new, grading.test_kv_cache_update, "only the new keys"),
    ("kv_cache_update", update_returns_only_new, grading.test_cached_decoding_equals_full_forward, "never read"),
    ("kv_cache_bytes", bytes_with_query_heads, grading.test_kv_cache_bytes, "query heads"),
    ("left_pad", right_pad, grading.test_left_pad, "right padding"),
    ("positions_from_mask", positions_count_padding, grading.test_positions_from_mask, "padding columns"),
    ("greedy_generate", lambda m, p, n, pad_id=0, eos_id=None: loop(m, p, n, cache=False),
     grading.test_greedy_generate_one_prompt, "cache is not used"),
    ("greedy_generate", lambda m, p, n, pad_id=0, eos_id=None: loop(m, p, n, cache=None),
     grading.test_greedy_generate_one_prompt, "feed only the new token"),
    ("greedy_generate", lambda m, p, n, pad_id=0, eos_id=None: loop(m, p, n, restart=True),
     grading.test_greedy_generate_one_prompt, "restart at 0"),
    ("greedy_generate", lambda m, p, n, pad_id=0, eos_id=None: loop(m, p, n, pad=right_pad),
     grading.test_greedy_generate_batch, "right padding"),
    ("greedy_generate", lambda m, p, n, pad_id=0, eos_id=None: loop(m, p, n, restart=True),
     grading.test_generation_in_the_real_model, "restart at 0"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("name", "bug", "checkpoint", "hint"), PLANTS, ids=[f"{p[0]}-{p[3]}" for p in PLANTS]
)
def test_planted_mistake_is_caught(solutions, assert_caught, name, bug, checkpoint, hint):
    assert_caught(checkpoint, solutions.with_overrides("ch08", **{name: bug}), hint=hint)


def test_untouched_solutions_pass_the_planted_checkpoints(solutions):
    """The plants fail because of the bug, not because the checkpoints fail anyway."""
    for checkpoint in {p[2] for p in PLANTS}:
        checkpoint(solutions)
