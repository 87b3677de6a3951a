"""Sampling: each filter and penalty by hand, distributions by counting, and (crosscheck) against transformers."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from tinyqwen.errors import GenerationError
from tinyqwen.sampling import (
    NON_THINKING,
    THINKING,
    SamplingParams,
    apply_presence_penalty,
    apply_repetition_penalty,
    min_p_filter,
    process_logits,
    sample,
    softmax,
    top_k_filter,
    top_p_filter,
)

logit_vectors = arrays(np.float64, st.integers(2, 40), elements=st.floats(-20, 20, allow_nan=False))


# ------------------------------------------------------------------------------------------ penalties


def test_repetition_penalty_divides_positive_and_multiplies_negative_once_per_token():
    logits = np.array([3.0, -1.0, 2.0, 0.5])
    out = apply_repetition_penalty(logits, [0, 1, 1, 1], 1.5)  # id 1 three times: still penalised once
    np.testing.assert_allclose(out, [2.0, -1.5, 2.0, 0.5])
    assert logits[0] == 3.0, "the input must not be modified in place"


def test_presence_and_frequency_penalty_count_output_tokens():
    out = apply_presence_penalty(np.zeros(4), [1, 3, 3, 3], presence=0.5, frequency=0.25)
    np.testing.assert_allclose(out, [0.0, -0.75, 0.0, -1.25])


def test_penalties_apply_in_greedy_mode_too():
    # id 0 leads, but it was already generated; a strong presence penalty hands the arg-max to id 1
    params = SamplingParams(presence_penalty=2.0)
    assert sample(np.array([3.0, 2.0]), None, params, prompt_ids=[], output_ids=[0]) == 1
    params = SamplingParams(repetition_penalty=2.0)
    assert sample(np.array([3.0, 2.0]), None, params, prompt_ids=[0], output_ids=[]) == 1  # 1.5 < 2.0


# ------------------------------------------------------------------------------------------ filters


def test_top_k_keeps_the_k_largest_and_ties():
    out = top_k_filter(np.array([1.0, 5.0, 3.0, 3.0, 0.0]), 2)
    assert np.isfinite(out).tolist() == [False, True, True, True, False]  # the tie at the 2nd place stays
    assert np.array_equal(top_k_filter(np.array([1.0, 2.0]), 0), [1.0, 2.0])


@settings(max_examples=200, deadline=None)
@given(logit_vectors, st.floats(0.01, 1.0))
def test_top_p_keeps_the_smallest_set_reaching_p(logits, p):
    probs = softmax(logits)
    kept = np.isfinite(top_p_filter(logits, p))
    assert kept.sum() >= 1
    assert kept[np.argmax(probs)], "the most likely token is always kept"
    # a kept token is never less likely than a dropped one
    if (~kept).any():
        assert probs[kept].min() >= probs[~kept].max()
    # enough mass ...
    assert probs[kept].sum() >= p - 1e-6 or kept.all()
    # ... and minimal: without its least likely member the kept set falls short of p
    if kept.sum() > 1:
        assert probs[kept].sum() - probs[kept].min() < p + 1e-6


@settings(max_examples=200, deadline=None)
@given(logit_vectors, st.floats(0.0, 1.0))
def test_min_p_keeps_tokens_above_a_fraction_of_the_top(logits, min_p):
    probs = softmax(logits)
    kept = np.isfinite(min_p_filter(logits, min_p))
    expected = probs >= min_p * probs.max() * (1 - 1e-9)
    assert kept[np.argmax(probs)]
    np.testing.assert_array_equal(kept, expected | (probs == probs.max()))


def test_pipeline_order_is_penalties_temperature_top_k_top_p_min_p():
    # worked by hand: logits [4, 3, 2, 1, 0], T = 0.5 -> [8, 6, 4, 2, 0]; top-k 3 drops ids 3, 4;
    # softmax over [8, 6, 4] = [0.867, 0.117, 0.016]; top-p 0.9 keeps ids 0, 1 (0.867 < 0.9 needs the second)
    params = SamplingParams(temperature=0.5, top_k=3, top_p=0.9)
    out = process_logits(np.array([4.0, 3.0, 2.0, 1.0, 0.0]), params)
    np.testing.assert_allclose(out[:2], [8.0, 6.0])
    assert np.isneginf(out[2:]).all()
    # min-p after temperature: at T = 0.5 id 1 has p1/p0 = e^-2 = 0.135 < 0.2 -> dropped; at T = 1 it is 0.37
    assert np.isneginf(process_logits(np.array([4.0, 3.0]), SamplingParams(temperature=0.5, min_p=0.2))[1])
    assert np.isfinite(process_logits(np.array([4.0, 3.0]), SamplingParams(temperature=1.0, min_p=0.2))[1])


# ------------------------------------------------------------------------------------------ drawing


def test_greedy_is_argmax_with_lowest_id_on_ties():
    assert sample(np.array([1.0, 7.0, 7.0, 2.0]), None, SamplingParams()) == 1


def test_samples_follow_the_softmax_distribution():
    logits = np.array([2.0, 1.0, 0.0, -1.0, 0.5])
    rng = np.random.default_rng(1234)
    n = 40_000
    draws = np.array([sample(logits, rng, SamplingParams(temperature=1.0)) for _ in range(n)])
    freq = np.bincount(draws, minlength=5) / n
    expected = softmax(logits)
    # 5 standard deviations of a binomial proportion: fails with probability < 1e-5 per token
    sigma = np.sqrt(expected * (1 - expected) / n)
    assert np.all(np.abs(freq - expected) < 5 * sigma), (freq, expected)


def test_temperature_sharpens_and_flattens():
    logits = np.array([1.0, 0.0])
    rng = np.random.default_rng(0)

    def share_of_top(t):
        return np.mean([sample(logits, rng, SamplingParams(temperature=t)) == 0 for _ in range(4000)])

    # exact shares: T=0.25 -> 1/(1+e^-4) = 0.982, T=4 -> 1/(1+e^-0.25) = 0.562
    assert abs(share_of_top(0.25) - 0.982) < 0.02
    assert abs(share_of_top(4.0) - 0.562) < 0.04


def test_top_p_never_samples_outside_the_nucleus():
    rng = np.random.default_rng(7)
    logits = rng.normal(0, 2, 200)
    params = SamplingParams(temperature=1.0, top_p=0.6)
    nucleus = set(np.flatnonzero(np.isfinite(top_p_filter(logits, 0.6))).tolist())
    assert 1 < len(nucleus) < 200
    drawn = {sample(logits, rng, params) for _ in range(3000)}
    assert drawn <= nucleus
    assert len(drawn) == len(nucleus), "every nucleus token should show up in 3000 draws"


def test_top_k_and_min_p_never_sample_dropped_tokens():
    rng = np.random.default_rng(3)
    logits = rng.normal(0, 1, 100)
    top5 = set(np.argsort(-logits)[:5].tolist())
    assert {sample(logits, rng, SamplingParams(temperature=1.0, top_k=5)) for _ in range(2000)} <= top5
    keep = set(np.flatnonzero(softmax(logits) >= 0.5 * softmax(logits).max()).tolist())
    assert {sample(logits, rng, SamplingParams(temperature=1.0, min_p=0.5)) for _ in range(2000)} <= keep


def test_a_seed_reproduces_a_run_and_another_seed_does_not():
    logits = np.random.default_rng(0).normal(0, 1, 1000)
    params = SamplingParams(temperature=1.0)

    def run(seed):
        rng = np.random.default_rng(seed)
        return [sample(logits, rng, params) for _ in range(50)]

    assert run(42) == run(42)
    assert run(42) != run(43)


def test_sampling_without_a_generator_is_an_error():
    with pytest.raises(GenerationError, match="random generator"):
        sample(np.zeros(3), None, SamplingParams(temperature=1.0))


# ------------------------------------------------------------------------------------------ params


@pytest.mark.parametrize(
    "bad, message",
    [
        ({"temperature": -0.1}, "temperature"),
        ({"temperature": float("nan")}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_k": -1}, "top_k"),
        ({"top_k": 2.5}, "top_k"),
        ({"min_p": 1.5}, "min_p"),
        ({"repetition_penalty": 0.0}, "repetition_penalty"),
        ({"presence_penalty": "high"}, "presence_penalty"),
    ],
)
def test_bad_values_are_rejected_by_name(bad, message):
    with pytest.raises(GenerationError, match=message):
        SamplingParams(**bad)


def test_qwen_presets():
    assert (THINKING.temperature, THINKING.top_p, THINKING.top_k, THINKING.min_p) == (0.6, 0.95, 20, 0.0)
    assert (NON_THINKING.temperature, NON_THINKING.top_p, NON_THINKING.top_k, NON_THINKING.min_p) == (
        0.7, 0.8, 20, 0.0,
    )  # fmt: skip


def test_from_generation_config_reads_qwen3_values_and_do_sample_false():
    from tinyqwen.testing import QWEN3_GENERATION_CONFIG

    p = SamplingParams.from_generation_config(QWEN3_GENERATION_CONFIG)
    assert p == THINKING  # Qwen3's generation_config.json *is* the thinking preset
    assert SamplingParams.from_generation_config({"do_sample": False, "temperature": 0.6}).greedy
    assert SamplingParams.from_generation_config({}) == SamplingParams()
    with pytest.raises(GenerationError, match="top_k"):
        SamplingParams.from_generation_config({"top_k": "twenty"})
    assert THINKING.override(temperature=None, top_k=5).top_k == 5


# ------------------------------------------------------------------------------------------ crosscheck


@pytest.mark.crosscheck
def test_processors_match_transformers():
    torch = pytest.importorskip("torch")
    gen = pytest.importorskip("transformers.generation.logits_process")
    rng = np.random.default_rng(0)
    for trial in range(20):
        logits = rng.normal(0, 3, 300).astype(np.float32)
        prompt = rng.integers(0, 300, 10).tolist()
        params = SamplingParams(
            temperature=float(rng.uniform(0.3, 1.5)),
            top_k=int(rng.integers(0, 60)),
            top_p=float(rng.uniform(0.3, 1.0)),
            min_p=float(rng.choice([0.0, 0.05, 0.2])),
            repetition_penalty=float(rng.uniform(1.0, 1.6)),
        )
        processors = [
            gen.RepetitionPenaltyLogitsProcessor(params.repetition_penalty),
            gen.TemperatureLogitsWarper(params.temperature),
        ]
        if params.top_k:
            processors.append(gen.TopKLogitsWarper(params.top_k))
        processors.append(gen.TopPLogitsWarper(params.top_p))
        if params.min_p:
            processors.append(gen.MinPLogitsWarper(params.min_p))
        ids = torch.tensor([prompt])
        scores = torch.tensor(logits[None])
        for proc in processors:
            scores = proc(ids, scores)
        theirs = scores[0].numpy()
        ours = process_logits(logits, params, prompt_ids=prompt)
        np.testing.assert_array_equal(np.isfinite(ours), np.isfinite(theirs), err_msg=f"trial {trial}")
        kept = np.isfinite(ours)
        np.testing.assert_allclose(ours[kept], theirs[kept], rtol=1e-5, atol=1e-5)
