"""Generation: the decode loop on a stub model (exact bookkeeping), then on the transformers fixtures
(greedy token-identity with transformers' `generate`, single and batched; KV-cache logits vs full forward)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import StubModel, hashed_rule, one_hot_rule

import tinyqwen
from tinyqwen.errors import GenerationError
from tinyqwen.generation import generate, generate_batch, stream_generate

FIXTURES = Path(__file__).parent / "fixtures"
GENERATE_FIXTURES = sorted(p.parent.name for p in FIXTURES.glob("*/generate.json"))
MODEL_FIXTURES = sorted(p.parent.name for p in FIXTURES.glob("*/config.json"))


def counter_model(**kwargs) -> StubModel:
    """next id = last id + 1 (mod 1000): easy to predict by hand."""
    return StubModel(one_hot_rule(lambda h: (h[-1] + 1) % 1000), **kwargs)


# ------------------------------------------------------------------------------------------ the loop (stub)


def test_greedy_continues_and_returns_only_new_ids():
    assert generate(counter_model(), [5, 6, 7], 4) == [8, 9, 10, 11]
    assert tinyqwen.generate(counter_model(), np.array([5]), 2) == [6, 7]  # the public name, a NumPy prompt


def test_stops_after_an_eos_id_and_returns_it():
    assert generate(counter_model(), [5], 10, eos_token_ids=[8]) == [6, 7, 8]
    assert generate(counter_model(), [5], 10, eos_token_ids=8) == [6, 7, 8]
    assert generate(counter_model(), [5], 10, eos_token_ids=()) == list(range(6, 16))


def test_default_eos_comes_from_generation_config():
    model = StubModel(one_hot_rule(lambda h: 151645 if len(h) > 3 else 42),
                      generation_config={"eos_token_id": [151645, 151643]})  # fmt: skip
    assert generate(model, [1, 2], 10) == [42, 42, 151645]
    assert generate(model, [1, 2], 5, eos_token_ids=()) == [42, 42, 151645, 151645, 151645]


def test_zero_new_tokens_and_the_context_limit():
    assert generate(counter_model(), [1], 0) == []
    model = counter_model(max_position_embeddings=8)
    assert generate(model, [1, 2, 3], 100) == [4, 5, 6, 7, 8]  # cut to the 8-position context
    with pytest.raises(GenerationError, match="prompt has 8 tokens but the model's context is 8"):
        generate(model, list(range(8)), 1)


def test_prefill_then_one_token_per_step_and_chunked_prefill():
    model = counter_model()
    generate(model, list(range(10)), 3)
    assert model.calls == [(1, 10), (1, 1), (1, 1)]  # no forward for a token nobody will read
    model = counter_model()
    assert generate(model, list(range(10)), 3, prefill_chunk_size=4) == [10, 11, 12]
    assert model.calls == [(1, 4), (1, 4), (1, 2), (1, 1), (1, 1)]


def test_stream_generate_yields_the_same_ids_lazily():
    stream = stream_generate(counter_model(), [1], 3)
    assert next(stream) == 2
    assert list(stream) == [3, 4]


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda m: generate(m, [], 3), "empty"),
        (lambda m: generate(m, [1, 200_000], 3), "200000 at position 1 is outside"),
        (lambda m: generate(m, [1.5], 3), "integer"),
        (lambda m: generate(m, [[1, 2]], 3), "generate_batch"),
        (lambda m: generate(m, [1], -1), "max_new_tokens"),
        (lambda m: generate(m, [1], 3, temperature=-1), "temperature"),
        (lambda m: generate(m, [1], 3, top_p=2.0, temperature=1.0), "top_p"),
        (lambda m: generate(m, [1], 3, topk=5), "unknown generation option"),
        (lambda m: generate(m, [1], 3, prefill_chunk_size=0), "prefill_chunk_size"),
        (lambda m: generate(m, [1], 3, eos_token_ids=[-3]), "eos id -3"),
        (lambda m: generate(m, [1], 3, seed=1, rng=np.random.default_rng()), "either seed"),
        (lambda m: generate_batch(m, [[1], []], 3), "prompt 1 is empty"),
    ],
)
def test_bad_arguments_raise_generation_error(call, message):
    with pytest.raises(GenerationError, match=message):
        call(counter_model())


def test_sampling_defaults_come_from_generation_config():
    # the checkpoint says top_k=1: sampling at any temperature is then greedy, unless the call overrides it
    model = StubModel(hashed_rule(64), vocab_size=64, generation_config={"top_k": 1, "eos_token_id": []})
    greedy = generate(model, [3], 20)
    assert generate(model, [3], 20, temperature=5.0, seed=0) == greedy
    assert generate(model, [3], 20, temperature=5.0, seed=0, top_k=0) != greedy


def test_a_seed_reproduces_a_sampled_run():
    model = StubModel(hashed_rule(64), vocab_size=64)
    run = generate(model, [3, 4], 30, temperature=1.0, seed=7)
    assert generate(model, [3, 4], 30, temperature=1.0, seed=7) == run
    assert generate(model, [3, 4], 30, temperature=1.0, seed=8) != run
    rng = np.random.default_rng(7)
    assert generate(model, [3, 4], 30, temperature=1.0, rng=rng) == run


def test_batch_rows_equal_single_runs_greedy_and_sampled():
    model = StubModel(hashed_rule(64), vocab_size=64)
    prompts = [[1, 2, 3, 4, 5], [7], [9, 9, 9]]
    for kwargs in ({}, {"temperature": 0.8, "top_p": 0.9, "seed": 11}):
        batch = generate_batch(model, prompts, 12, eos_token_ids=[0, 1], **kwargs)
        assert batch == [generate(model, p, 12, eos_token_ids=[0, 1], **kwargs) for p in prompts]


def test_batch_rows_stop_independently():
    model = counter_model()
    out = generate_batch(model, [[1], [5], [100]], 6, eos_token_ids=[4, 8])
    assert out == [[2, 3, 4], [6, 7, 8], [101, 102, 103, 104, 105, 106]]


# ------------------------------------------------------------------------------------------ the fixtures


def load_generate_fixture(name: str) -> tuple:
    """The model and generate.json (schema: tests/fixtures/README.md; transformers ran with eos switched off)."""
    path = FIXTURES / name
    ref = json.loads((path / "generate.json").read_text())
    assert ref["eos_token_id"] is None and ref["padding_side"] == "left"
    return tinyqwen.load_model(path), ref


def test_generate_fixtures_are_present():
    assert GENERATE_FIXTURES, f"no */generate.json under {FIXTURES}"
    kinds = [json.loads((FIXTURES / n / "config.json").read_text()) for n in GENERATE_FIXTURES]
    assert any(c["model_type"] == "qwen3" for c in kinds)
    assert any(c["model_type"] == "qwen3_moe" for c in kinds)
    assert any(
        (c.get("rope_scaling") or c.get("rope_parameters") or {}).get("rope_type") == "yarn" for c in kinds
    )


@pytest.mark.parametrize("name", GENERATE_FIXTURES)
def test_greedy_matches_transformers_single_and_batched(name):
    model, ref = load_generate_fixture(name)
    n = ref["max_new_tokens"]
    for prompt, expected in zip(ref["prompts"], ref["single"], strict=True):
        assert generate(model, prompt, n, eos_token_ids=()) == expected, prompt
    # the batch: we pad ourselves; check our padding is the one transformers was given
    ours = generate_batch(model, ref["prompts"], n, eos_token_ids=(), pad_token_id=ref["pad_token_id"])
    assert ours == ref["batch"]["new_tokens"]
    assert ours == ref["single"]  # each batch row equals the row generated alone


@pytest.mark.parametrize("name", MODEL_FIXTURES)
def test_kv_cache_logits_equal_full_forward_at_every_step(name):
    model = tinyqwen.load_model(FIXTURES / name)
    rng = np.random.default_rng(0)
    vocab = model.config.vocab_size
    ids = rng.integers(0, vocab, 24)
    full = model.forward(ids[None]).logits[0]  # [24, vocab], no cache
    for chunk in (None, 5):
        cache = model.new_cache(1, 24)
        prefill = 8
        chunk = chunk or prefill
        steps = [model.forward(ids[None, s : min(s + chunk, prefill)], cache=cache).logits[0]
                 for s in range(0, prefill, chunk)]  # fmt: skip
        np.testing.assert_allclose(np.concatenate(steps), full[:prefill], rtol=0, atol=1e-4)
        for t in range(prefill, 24):
            step = model.forward(ids[None, t : t + 1], cache=cache).logits[0, 0]
            np.testing.assert_allclose(step, full[t], rtol=0, atol=1e-4, err_msg=f"{name}: step {t}")
        assert cache.length == 24


@pytest.mark.parametrize("name", MODEL_FIXTURES)
def test_left_padded_batch_decoding_equals_full_forward_per_row(name):
    """Every step of a left-padded batch with a cache gives each row the logits of its own full forward."""
    model = tinyqwen.load_model(FIXTURES / name)
    rng = np.random.default_rng(1)
    rows = [rng.integers(0, model.config.vocab_size, n) for n in (12, 7, 3)]
    total = 12
    ids = np.zeros((3, total), dtype=np.int64)
    mask = np.zeros((3, total), dtype=np.int64)
    for b, r in enumerate(rows):
        ids[b, total - len(r) :], mask[b, total - len(r) :] = r, 1
    cache = model.new_cache(3, total)
    prefill = 9  # rows 2 and 1 start inside the prefill; all rows decode the last 3 columns one at a time
    model.forward(ids[:, :prefill], cache=cache, attention_mask=mask[:, :prefill])
    for t in range(prefill, total):
        step = model.forward(ids[:, t : t + 1], cache=cache, attention_mask=mask[:, : t + 1]).logits[:, 0]
        for b, r in enumerate(rows):
            alone = model.forward(r[None, : len(r) - (total - 1 - t)]).logits[0, -1]
            np.testing.assert_allclose(step[b], alone, rtol=0, atol=1e-4, err_msg=f"{name}: row {b}, col {t}")


@pytest.mark.parametrize("name", GENERATE_FIXTURES[:1])
def test_chunked_prefill_gives_the_same_tokens(name):
    model, ref = load_generate_fixture(name)
    prompt, expected = ref["prompts"][0], ref["single"][0]
    assert generate(model, prompt, ref["max_new_tokens"], eos_token_ids=(), prefill_chunk_size=3) == expected
