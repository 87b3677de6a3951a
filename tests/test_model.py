"""The NumPy model against Hugging Face transformers' float32 outputs stored in tests/fixtures/<name>/reference.npz.

Tolerance: 1e-4 absolute on logits and hidden states. Both sides compute in float32; the remaining differences come
from summation order in matrix products (BLAS vs torch), ~1e-6 relative per layer, far below 1e-4 at these sizes
(logits of order 1-10). A wrong formula (RoPE layout, norm order, a missing scale, a wrong expert) gives differences
of order 0.1-1, so 1e-4 cannot hide a real mistake.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

import tinyqwen

FIXTURES = Path(__file__).parent / "fixtures"
NAMES = sorted(p.parent.name for p in FIXTURES.glob("*/reference.npz"))
ATOL = 1e-4


def test_fixtures_are_present():
    # the acceptance list names five kinds of checkpoint; make sure none silently disappeared
    assert len(NAMES) >= 5, f"expected >= 5 reference fixtures in {FIXTURES}, found {NAMES}"
    kinds = [json.loads((FIXTURES / n / "config.json").read_text()) for n in NAMES]
    assert any(c["model_type"] == "qwen3" and c["tie_word_embeddings"] for c in kinds)
    assert any(c["model_type"] == "qwen3" and not c["tie_word_embeddings"] for c in kinds)
    assert any((c.get("rope_scaling") or {}).get("rope_type") == "yarn" for c in kinds)
    assert any(c["model_type"] == "qwen3_moe" and c["norm_topk_prob"] for c in kinds)
    assert any(
        c["model_type"] == "qwen3_moe" and not c["norm_topk_prob"] and c["mlp_only_layers"] for c in kinds
    )
    assert any((FIXTURES / n / "model.safetensors.index.json").exists() for n in NAMES)


@pytest.fixture(scope="module", params=NAMES)
def fixture(request):
    path = FIXTURES / request.param
    return tinyqwen.load_model(path), dict(np.load(path / "reference.npz"))


def test_batch_logits_match_transformers(fixture):
    model, ref = fixture
    logits = model(ref["input_ids"])
    assert logits.dtype == np.float32 and logits.shape == ref["logits"].shape
    np.testing.assert_allclose(logits, ref["logits"], rtol=0, atol=ATOL)


def test_single_sequence_logits_match_transformers(fixture):
    model, ref = fixture
    logits = model(ref["single_input_ids"])
    assert logits.shape == ref["single_logits"].shape
    np.testing.assert_allclose(logits, ref["single_logits"], rtol=0, atol=ATOL)


def test_hidden_states_match_layer_by_layer(fixture):
    model, ref = fixture
    out = model.forward(ref["input_ids"], return_hidden_states=True)
    expected = ref["hidden_states"]
    assert len(out.hidden_states) == len(expected) == model.config.num_hidden_layers + 1
    for i, (got, want) in enumerate(zip(out.hidden_states, expected, strict=True)):
        # relative to the size of the residual stream, which grows layer by layer
        err = np.abs(got - want).max() / max(1.0, np.abs(want).max())
        assert err <= ATOL, (
            f"hidden state {i} ({'embeddings' if i == 0 else f'after layer {i - 1}'}) differs by {err}"
        )


def test_router_logits_and_aux_loss(fixture):
    model, ref = fixture
    logits, router_logits = model(ref["input_ids"], return_router_logits=True)
    if "router_logits" not in ref:
        assert router_logits == [] and not model.config.is_moe
        return
    c = model.config
    assert (
        len(router_logits)
        == ref["router_logits"].shape[0]
        == sum(map(c.is_moe_layer, range(c.num_hidden_layers)))
    )
    for got, want in zip(router_logits, ref["router_logits"], strict=True):
        np.testing.assert_allclose(got, want, rtol=0, atol=ATOL)
    aux = tinyqwen.load_balancing_loss(router_logits, c.num_experts, c.num_experts_per_tok)
    assert aux == pytest.approx(float(ref["aux_loss"]), rel=1e-5)


def test_kv_cache_matches_full_forward(fixture):
    model, ref = fixture
    ids = ref["input_ids"]
    full = model(ids)
    cache = model.new_cache(batch_size=ids.shape[0], max_len=ids.shape[1])
    steps = [model.forward(ids[:, :5], cache=cache).logits]  # prefill, then one token at a time
    for t in range(5, ids.shape[1]):
        steps.append(model.forward(ids[:, t : t + 1], cache=cache).logits)
    np.testing.assert_allclose(np.concatenate(steps, axis=1), full, rtol=0, atol=ATOL)
    assert cache.length == ids.shape[1]
    # GQA-shaped: kv heads, not one copy per query head
    assert cache.keys[0].shape[1] == model.config.num_key_value_heads


def test_left_padded_row_equals_unpadded(fixture):
    model, ref = fixture
    pad = 3
    ids = ref["single_input_ids"][:-pad]
    batch = np.stack([np.concatenate([np.zeros(pad, ids.dtype), ids]), ref["single_input_ids"]])
    mask = np.ones_like(batch)
    mask[0, :pad] = 0
    out = model.forward(batch, attention_mask=mask).logits
    np.testing.assert_allclose(out[0, pad:], model(ids), rtol=0, atol=ATOL)
    np.testing.assert_allclose(out[1], model(batch[1]), rtol=0, atol=ATOL)
