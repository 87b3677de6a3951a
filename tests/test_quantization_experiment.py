"""The pieces of chapter 14's experiment (training/quantization_experiment.py) on a fixture MoE model: every weight
matrix goes through the format (the experts one by one), the norms and the router stay exactly as they were, a
tied head stays the embedding, and the error per weight is what the format allows."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

import tinyqwen
from tinyqwen.model import MoEWeights

REPO = Path(__file__).resolve().parent.parent
spec = importlib.util.spec_from_file_location(
    "quantization_experiment", REPO / "training" / "quantization_experiment.py"
)
experiment = importlib.util.module_from_spec(spec)
spec.loader.exec_module(experiment)


@pytest.mark.parametrize("fixture", ["moe-norm-topk", "moe-sparse-step"])
def test_quantized_weights_touch_every_matrix_and_nothing_else(fixture):
    w = tinyqwen.load_model(REPO / "tests" / "fixtures" / fixture).weights
    q = experiment.quantized_weights(w, "q8_0")
    assert (q.lm_head is q.embed) == (w.lm_head is w.embed)
    assert np.array_equal(q.norm, w.norm)
    for a, b in zip(w.layers, q.layers, strict=True):
        assert np.array_equal(a.input_norm, b.input_norm) and np.array_equal(a.attn.q_norm, b.attn.q_norm)
        mats = [(getattr(a.attn, n), getattr(b.attn, n)) for n in ("q_proj", "k_proj", "v_proj", "o_proj")]
        mats += [(getattr(a.mlp, n), getattr(b.mlp, n)) for n in ("gate_proj", "up_proj", "down_proj")]
        if isinstance(a.mlp, MoEWeights):
            assert np.array_equal(a.mlp.router, b.mlp.router)  # llama.cpp keeps ffn_gate_inp in F32 too
        for old, new in [*mats, (w.embed, q.embed)]:
            assert new.shape == old.shape and not np.array_equal(new, old)
            # Q8_0 by hand: |w − d·q| ≤ d/2 + 127·d·2^-11 (d rounded to float16), d = absmax of the block / 127
            blocks = np.asarray(old, np.float32).reshape(-1, 32)
            d = np.abs(blocks).max(axis=1, keepdims=True) / 127
            assert (np.abs(new.reshape(-1, 32) - blocks) <= d * (0.5 + 127 * 2.0**-11) + 1e-12).all()


def test_formats_order_by_bits():
    """The round trip's error grows as the bits shrink: bf16 < Q8_0 < Q4_K on the same matrix."""
    x = (np.random.default_rng(0).standard_normal((64, 256)) * 0.05).astype(np.float32)
    err = {f: np.linalg.norm(experiment.round_trip(x, f) - x) / np.linalg.norm(x) for f in experiment.FORMATS}
    assert err["float32"] == 0 < err["bf16"] < err["q8_0"] < err["q4_k"] < 0.1, err
