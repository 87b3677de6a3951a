"""Capstone checkpoints (parts II and III): one decoder layer and the whole forward pass, written from the math.

Expected values come from transformers only: the Qwen3DecoderLayer stored in exercises/references/
ch06_dense_model.npz (made by exercises/references/make_ch06_dense_model.py) and each fixture's reference.npz
(transformers' logits; tests/fixtures/make_fixtures.py). Where a classic mistake is named, its wrong output comes
from the same stored file (the wrong wirings transformers' own sublayers give) or, for MoE renormalisation and
YaRN, from the solutions run with that one switch flipped (only to name the mistake, never as the expected value).

Tolerances (float32 on both sides): 1e-4 for the layer (values up to ~10 through attention and four norms, as
chapter 6), and for logits the project's one definition, tinyqwen.verify.tolerance: 1e-5 · max(1, max |logit|).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from exercises.grading import (
    FIXTURES,
    Mistake,
    call,
    expect,
    expect_close,
    expect_logits,
    notebook,
    reference,
    reference_file,
)
from tinyqwen.checkpoint import Checkpoint
from tinyqwen.config import Qwen3Config, load_config

REF = reference_file("ch06_dense_model.npz")
LAYER = notebook(6, "2. The decoder block")
MODEL = notebook(6, "3. The whole model")
MOE = notebook(7, "6. The whole MoE model")
YARN = notebook(4, "9. YaRN: stretch only the slow pairs")
LAYER_KEYS = [k.removeprefix("decoder.w.") for k in REF if k.startswith("decoder.w.")]

# the layer transformers ran (exercises/references/make_ch06_dense_model.py, decoder_refs)
LAYER_CONFIG = Qwen3Config(
    model_type="qwen3", vocab_size=32, hidden_size=48, intermediate_size=96, num_hidden_layers=1,
    num_attention_heads=4, num_key_value_heads=2, head_dim=16, rms_norm_eps=1e-6, rope_theta=10000.0,
    max_position_embeddings=64, tie_word_embeddings=True,
)  # fmt: skip


def _weights(fixture: str) -> dict[str, np.ndarray]:
    with Checkpoint(FIXTURES / fixture) as ckpt:
        return {name: np.array(ckpt.get(name), dtype=np.float32) for name in sorted(ckpt.keys())}


def _solution():
    from exercises.solutions import ch15_capstone_model

    return ch15_capstone_model


def test_decoder_layer(course):
    """One decoder layer from the math, against transformers' Qwen3DecoderLayer"""
    x = REF["decoder.x"]
    x_before = x.copy()
    w = {k: REF["decoder.w." + k] for k in LAYER_KEYS}
    got = call(course.ch15.decoder_layer, x, w, LAYER_CONFIG, REF["decoder.positions"], reread=LAYER,
               what="decoder_layer(x, weights, config, positions)")  # fmt: skip
    expect(np.array_equal(x, x_before), what="decoder_layer", reread=LAYER,
           problem="your decoder_layer changed its input x in place: the residual stream is the caller's")  # fmt: skip
    expect_close(
        got, REF["decoder.out"], what="decoder_layer against transformers' Qwen3DecoderLayer", atol=1e-4,
        reread=LAYER, inputs="x [2, 6, 48], 4 query / 2 kv heads of head_dim 16; row 1 at positions 4..9",
        mistakes=[
            Mistake("post-norm wiring: out = norm(x + sublayer(x))", REF["decoder.post_norm"],
                    "Qwen3 is pre-norm: each sublayer reads a normalised copy; its output is added to x itself."),
            Mistake("the attention residual is missing", REF["decoder.no_attn_residual"]),
            Mistake("the MLP residual is missing", REF["decoder.no_mlp_residual"]),
            Mistake("x itself was normalised before the residual", REF["decoder.norm_in_residual"]),
            Mistake("the two layer norms are swapped", REF["decoder.swapped_norms"],
                    "input_layernorm goes before attention, post_attention_layernorm before the MLP."),
        ],
    )  # fmt: skip


def _forward(course, fixture: str, reread: str):
    config = load_config(FIXTURES / fixture)
    ids = reference(fixture)["input_ids"]
    return call(course.ch15.forward, ids.copy(), _weights(fixture), config, reread=reread,
                what=f"forward on fixture {fixture}"), config, ids  # fmt: skip


def _flipped(fixture: str, ids: np.ndarray, **change):
    """The solution's logits with one config switch flipped: what that mistake produces on this input."""
    config = dataclasses.replace(load_config(FIXTURES / fixture), **change)
    return lambda: _solution().forward(ids, _weights(fixture), config)


def test_forward_dense(course):
    """The whole dense model: tied, then untied BF16 sharded"""
    for fixture in ("dense-tied", "dense-untied-bf16-sharded"):
        got, _, _ = _forward(course, fixture, MODEL)
        mistakes = [
            Mistake("the final RMSNorm (model.norm) is missing", REF[f"forward.{fixture}.no_final_norm"])
        ]
        if f"forward.{fixture}.embed_as_head" in REF:
            mistakes.append(Mistake("the embedding was used as the head", REF[f"forward.{fixture}.embed_as_head"],
                                    "tie_word_embeddings is false here: the head is 'lm_head.weight'."))  # fmt: skip
        expect_logits(
            got, fixture, what=f"forward({fixture}) against transformers", reread=MODEL, mistakes=mistakes
        )


def test_forward_yarn(course):
    """The whole dense model with YaRN in its config"""
    got, config, ids = _forward(course, "dense-yarn", YARN)
    expect_logits(got, "dense-yarn", what="forward(dense-yarn) against transformers", reread=YARN,
                  mistakes=[Mistake("the config's rope_scaling (YaRN) was ignored",
                                    _flipped("dense-yarn", ids, rope_scaling=None),
                                    "With rope_scaling, the frequencies are YaRN's and cos/sin are scaled by its "
                                    "attention factor (chapter 4).")])  # fmt: skip


def test_forward_moe(course):
    """The whole Qwen3-MoE: renormalised top-k, and experts only every other layer"""
    for fixture in ("moe-norm-topk", "moe-sparse-step"):
        got, config, ids = _forward(course, fixture, MOE)
        expect_logits(got, fixture, what=f"forward({fixture}) against transformers", reread=MOE,
                      mistakes=[Mistake("norm_topk_prob was ignored (the k weights renormalised, or not, against "
                                        "the config)", _flipped(fixture, ids, norm_topk_prob=not config.norm_topk_prob),
                                        "Renormalise the k chosen weights to sum to 1 exactly when norm_topk_prob "
                                        "is true.")])  # fmt: skip
