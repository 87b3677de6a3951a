"""The NumPy model against Hugging Face transformers' float32 outputs stored in tests/fixtures/<name>/reference.npz.

Tolerance: `tinyqwen.verify.RTOL` (1e-5) of the compared values' size, `tolerance(ref)` = 1e-5 · max(1, max |ref|),
the project's one definition of "equal to the official implementation" (its docstring has the numbers). Both sides
compute in float32 and differ only in summation order: measured at most 1.7e-6 of the values' size here, on three
different OpenBLAS kernels. A real mistake is larger: Llama's RMSNorm eps (1e-5 instead of 1e-6) moves the logits by
2e-5 to 3e-5 of their size, a wrong RoPE layout, norm order or expert by 1e-2 to 1.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from conftest import logits_through_cache

import tinyqwen
from tinyqwen.verify import RTOL, tolerance

FIXTURES = Path(__file__).parent / "fixtures"
NAMES = sorted(p.parent.name for p in FIXTURES.glob("*/reference.npz"))


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
    np.testing.assert_allclose(logits, ref["logits"], rtol=0, atol=tolerance(ref["logits"]))


def test_single_sequence_logits_match_transformers(fixture):
    model, ref = fixture
    logits = model(ref["single_input_ids"])
    assert logits.shape == ref["single_logits"].shape
    np.testing.assert_allclose(logits, ref["single_logits"], rtol=0, atol=tolerance(ref["single_logits"]))


def test_hidden_states_match_layer_by_layer(fixture):
    model, ref = fixture
    out = model.forward(ref["input_ids"], return_hidden_states=True)
    expected = ref["hidden_states"]
    assert len(out.hidden_states) == len(expected) == model.config.num_hidden_layers + 1
    for i, (got, want) in enumerate(zip(out.hidden_states, expected, strict=True)):
        # relative to the size of the residual stream, which grows layer by layer
        err = np.abs(got - want).max() / max(1.0, np.abs(want).max())
        assert err <= RTOL, (
            f"hidden state {i} ({'embeddings' if i == 0 else f'after layer {i - 1}'}) differs by {err:.2e} "
            f"of its size (equal: <= {RTOL:g})"
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
        np.testing.assert_allclose(got, want, rtol=0, atol=tolerance(want))
    aux = tinyqwen.load_balancing_loss(router_logits, c.num_experts, c.num_experts_per_tok)
    assert abs(aux - float(ref["aux_loss"])) <= tolerance(ref["aux_loss"])


def test_kv_cache_matches_full_forward(fixture):
    model, ref = fixture
    ids = ref["input_ids"]
    full = model(ids)
    steps, cache = logits_through_cache(model, ids)  # prefill, then one token at a time
    np.testing.assert_allclose(steps, full, rtol=0, atol=tolerance(full))
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
    np.testing.assert_allclose(out[0, pad:], model(ids), rtol=0, atol=tolerance(out[0, pad:]))
    np.testing.assert_allclose(out[1], model(batch[1]), rtol=0, atol=tolerance(out[1]))


def test_the_tolerance_still_catches_a_subtle_mistake(fixture):
    """The bound must not be so loose that a real bug passes: Llama's RMSNorm eps (1e-5) in place of Qwen3's
    (1e-6), the subtlest mistake we know of, moves the logits by 1.9e-5 to 2.9e-5 of their size and must fail."""
    model, ref = fixture
    wrong = replace(model, config=replace(model.config, rms_norm_eps=1e-5))
    assert model.config.rms_norm_eps == 1e-6
    assert np.abs(wrong(ref["input_ids"]) - ref["logits"]).max() > tolerance(ref["logits"])
